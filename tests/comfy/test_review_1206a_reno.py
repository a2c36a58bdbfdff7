"""Review 1206a, ReNO (latentclip/reno.py, nodes/reno.py, latentclip/rewards.py).

1. A generator output (x0) with NaN or infinite values for one item, mid-run (an fp16 UNet overflowing on
   an optimised noise), aborted the whole batch's run with the Latent-CLIP's "latents contains NaN ...;
   expected finite raw VAE latents", which blames the user's input and throws away every item's progress,
   although the loop is written to skip such iterations (a NaN loss never becomes the best, a non-finite
   gradient is zeroed).
2. Non-finite x0 for the initial noise: with a Latent-CLIP reward the same misleading sentence; with the
   pixel reward no error at all, NaN latents came back as "best".
3. The ReNO node with a NaN cfg (an API prompt can carry one: ComfyUI's FLOAT range check lets NaN through)
   did not name cfg; a NaN learning_rate was reported as "lr" (the core's name, not the node's input).
"""
import json
import math

import open_clip
import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.reno import reno_optimize
from latentclip.rewards import LatentMatch, PixelCLIPMatch
from conftest import tiny_conditioning, tiny_reward_handle, tiny_sdxl

SIDE = 32


# -- core (no ComfyUI needed) ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_clip():
    torch.manual_seed(0)
    m = LatentCLIP("Latent-ViT-Tiny-test").eval()
    m.clip.logit_scale.data.fill_(math.log(100))
    return m


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    n = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1))
    return n.requires_grad_(False)


def _noise(b=2, seed=5):
    return torch.randn(b, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _generator(net, bad_call=None, bad_item=1, value=float("nan")):
    """noise -> raw latents; on call number ``bad_call`` (0-based) item ``bad_item`` gets ``value`` in one element."""
    calls = []

    def gen(z):
        x = 3 * torch.tanh(net(z))
        if len(calls) == bad_call:
            poison = torch.zeros_like(x)
            poison[bad_item, 0, 0, 0] = value
            x = x + poison
        calls.append(1)
        return x
    return gen


def _pixel_term():
    torch.manual_seed(2)
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval().requires_grad_(False)
    clip.logit_scale.data.fill_(math.log(100))
    decoder = torch.nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2).requires_grad_(False)
    return PixelCLIPMatch(clip, lambda z: torch.tanh(decoder(z)), "a red car")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_prediction_mid_run_is_skipped_not_fatal(latent_clip, net, value):
    reward = LatentMatch(latent_clip, "a red car")
    clean = reno_optimize(_generator(net), _noise(), reward, iterations=5)
    res = reno_optimize(_generator(net, bad_call=2, value=value), _noise(), reward, iterations=5)
    assert res.iterations_run == 5
    assert math.isnan(res.history["total"][2][1])                   # recorded as no score
    assert res.best_iteration[1] != 2 and torch.isfinite(res.latents).all()
    assert math.isfinite(res.best_loss[1]) and res.best_loss[1] <= res.initial_loss[1]
    # the other item never notices
    assert torch.allclose(res.latents[0], clean.latents[0], atol=1e-6)
    assert res.best_iteration[0] == clean.best_iteration[0]
    assert [row[0] for row in res.history["total"]] == pytest.approx([row[0] for row in clean.history["total"]])


def test_a_non_finite_prediction_mid_run_with_the_pixel_reward_keeps_the_best(net):
    res = reno_optimize(_generator(net, bad_call=1, bad_item=0), _noise(), _pixel_term(), iterations=4)
    assert math.isnan(res.history["total"][1][0]) and res.best_iteration[0] != 1
    assert torch.isfinite(res.latents).all()


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_a_non_finite_prediction_for_the_initial_noise_is_one_sentence_naming_the_generator(latent_clip, net, kind):
    reward = LatentMatch(latent_clip, "a red car") if kind == "latent" else _pixel_term()
    with pytest.raises(InputError, match=r"generator's output for the initial noise contains NaN or infinite "
                                         r"values \(item 2 of 2\)"):
        reno_optimize(_generator(net, bad_call=0), _noise(), reward, iterations=3)


# -- ComfyUI node ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cfg", "learning_rate"])   # grad_clip, regularization: already named
def test_reno_node_names_a_nan_float_input(comfy, name):
    handle = tiny_reward_handle(comfy, "tiny-reno.safetensors")
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=0.01).result[0]
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    args = dict(model=tiny_sdxl(), positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1), latent_image=latent,
                reward=reward, seed=5, iterations=2, learning_rate=5.0, optimizer="sgd", grad_clip=0.1,
                regularization=0.01, steps=1, cfg=1.0)
    args[name] = float("nan")
    with pytest.raises(ValueError, match=rf"^{name} is nan; expected a finite number"):
        comfy.run_node("LatentCLIPReNO", **args)
    assert torch.equal(latent["samples"], torch.zeros(1, 4, 32, 32))


def test_reno_sampler_node_names_a_nan_float_input(comfy):
    handle = tiny_reward_handle(comfy, "tiny-reno.safetensors")
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=0.01).result[0]
    with pytest.raises(ValueError, match=r"^learning_rate is nan; expected a finite number"):
        comfy.run_node("LatentCLIPReNOSampler", reward=reward, seed=0, iterations=2, learning_rate=float("nan"),
                       optimizer="sgd", grad_clip=0.1, regularization=0.01)


def test_history_of_a_run_with_a_skipped_iteration_is_still_plotted(latent_clip, net):
    """The node's history string and plot after a skipped (NaN) iteration (plotting ignores the gap)."""
    from latentclip.plotting import plot_reno_history
    res = reno_optimize(_generator(net, bad_call=1), _noise(), LatentMatch(latent_clip, "a red car"), iterations=3)
    summary = json.loads(res.to_json())
    assert plot_reno_history(summary["history"]).size[0] > 0


def test_reward_nodes_name_a_nan_weight(comfy):
    """ComfyUI's range check lets NaN through; the reward nodes refuse it naming `weight` at once, not
    ReNO later naming its own term ("match0")."""
    handle = tiny_reward_handle(comfy, "tiny-reno.safetensors")
    with pytest.raises(ValueError, match=r"^weight is nan; expected a finite number"):
        comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=float("nan"))
    with pytest.raises(ValueError, match=r"^weight is nan; expected a finite number"):
        comfy.run_node("LatentCLIPPixelReward", clip_name="mini-pixel-clip.safetensors", model_name="", vae=None,
                       text="a red fox", weight=float("nan"))
