"""Latents and VAEs checked against the MODEL's family before sampling, inside a real ComfyUI, on tiny random Flux-, SD3- and Wan-2.1-architecture models
(tiny_families): a Pixel-CLIP Reward's VAE checked against the MODEL, a 3-D VAE's single frame read,
noise masks kept with their items by Select Best, ReNO on Flux refused in one sentence, Safety Guidance
and head rewards checking the latent before sampling, and the families page naming real latent formats."""
import re
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip.errors import InputError
from latentclip.heads import Head
from test_head_nodes import head_file
import tiny_families as TF

REPO = Path(__file__).resolve().parents[2]
PIXEL_CLIP = "mini/mini-pixel-clip.safetensors"   # the shipped mini pixel CLIP (registered by the pack)
RENO = dict(seed=0, iterations=2, learning_rate=0.0, optimizer="sgd", grad_clip=0.1, regularization=0.01,
            gradient_checkpointing=False, steps=1, cfg=1.0)


def handle(comfy, family, seed=0):
    path = comfy.models / "latent_clip" / f"checks-{family}.safetensors"
    if not path.exists():
        latentclip.save(TF.tiny_family_latent_clip(family, seed), path)
    return comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]


def latent_reward(comfy, family):
    return comfy.run_node("LatentCLIPReward", latent_clip=handle(comfy, family), text="a cat", mode="match",
                          weight=0.01).result[0]


def pixel_reward(comfy, vae):
    return comfy.run_node("PixelCLIPReward", clip_name=PIXEL_CLIP, model_name="", vae=vae, text="a red circle",
                          weight=0.01).result[0]


def reno(comfy, model, reward, samples, **kw):
    cond = TF.tiny_dit_conditioning(0, samples.shape[0])
    return comfy.run_node("LatentCLIPReNO", model=model, positive=cond, negative=cond, latent_image={"samples": samples},
                          reward=reward, **{**RENO, **kw})


def random_wan_vae():
    """ComfyUI's Wan 2.1 VAE (3-D latents, comfy.sd.VAE detects it from the weights) with random weights."""
    import comfy.ldm.wan.vae
    import comfy.sd
    torch.manual_seed(0)
    with torch.inference_mode(False):
        net = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True], dropout=0.0)
    with torch.inference_mode():   # as VAELoader runs
        return comfy.sd.VAE(sd=net.state_dict())


def test_pixel_reward_with_a_vae_of_another_channel_count_is_refused_before_sampling(comfy):
    """The mini VAE makes 4-channel latents, the SD3 model 16: a raw conv shape error mid-run before."""
    _, _, mini_vae = comfy.run_node("LatentCLIPMiniWorldLoader", world="mini").result
    model, reward = TF.tiny_dit("sd3"), pixel_reward(comfy, mini_vae)
    with pytest.raises(InputError) as e:
        reno(comfy, model, reward, torch.zeros(1, 16, 16, 16))
    message = str(e.value)
    assert "Pixel-CLIP Reward's vae" in message and "4-channel" in message and "16-channel" in message
    assert "connect the model's own VAE" in message
    # the Search Sampler (through SamplerCustom) is refused the same way, before any step
    cond = TF.tiny_dit_conditioning(0, 1)
    search = comfy.run_node("LatentCLIPSearchSampler", reward=reward, sampler=comfy.run_node("KSamplerSelect", sampler_name="euler")[0],
                            particles=2, strategy="best_of_n", potential="difference", temperature=30.0, interval=1,
                            start=0, prune_steps="2", keep=0.5, seed=0, max_batch=0, score_every_step=False).result[0]
    sigmas = comfy.run_node("BasicScheduler", model=model, scheduler="simple", steps=2, denoise=1.0)[0]
    with pytest.raises(InputError, match="Pixel-CLIP Reward's vae"):
        comfy.run_node("SamplerCustom", model=model, add_noise=True, noise_seed=0, cfg=1.0, positive=cond, negative=cond,
                       sampler=search, sigmas=sigmas, latent_image={"samples": torch.zeros(1, 16, 16, 16)})


def test_pixel_reward_reads_the_single_frame_of_a_3d_vae_and_refuses_several_frames(comfy):
    """A Wan 2.1 VAE decodes [B, 16, 1, H, W] to [B, 3, 1, H', W']: the pixel reward scores that frame."""
    model, reward = TF.tiny_dit("wan21"), pixel_reward(comfy, random_wan_vae())
    x = torch.zeros(1, 16, 1, 8, 8)
    best, initial, history, _ = reno(comfy, model, reward, x).result
    assert best["samples"].shape == (1, 16, 1, 8, 8) and '"pixel0"' in history
    assert torch.equal(x, torch.zeros_like(x))
    with pytest.raises(InputError, match=r"^latent_image has 3 latent frames but .*single images"):
        reno(comfy, model, reward, torch.zeros(1, 16, 3, 8, 8))


def test_select_best_keeps_each_items_tiled_noise_mask(comfy):
    """ComfyUI gives item i the mask mask[i % n]; after selection each kept item must keep its own."""
    from comfy.utils import reshape_mask
    lc = handle(comfy, "sd3")
    torch.manual_seed(1)
    x = torch.randn(4, 16, 32, 32)
    scores = torch.tensor(comfy.run_node("LatentCLIPScore", latent_clip=lc, samples={"samples": x}, text="a cat").result[0])
    x = x[scores.argsort()]                               # worst first: Select Best returns them reversed
    mask = torch.stack([torch.full((1, 8, 8), v) for v in (0.0, 0.5, 1.0)])   # n = 3 masks for 4 items
    before = mask.clone()
    out = comfy.run_node("LatentCLIPSelectBest", latent_clip=lc, samples={"samples": x, "noise_mask": mask},
                         text="a cat", k=4).result[0]
    assert out["batch_index"] == [3, 2, 1, 0]
    used = reshape_mask(out["noise_mask"], out["samples"].shape)   # what a sampler applies
    for j, src in enumerate(out["batch_index"]):
        assert float(used[j].mean()) == float(mask[src % 3].mean()), (j, src)
    assert torch.equal(mask, before)


def test_reno_on_flux_is_refused_in_one_sentence_naming_the_model(comfy):
    """ComfyUI's Flux blocks add in place to activations autograd saved: a raw autograd traceback before."""
    with pytest.raises(InputError) as e:
        reno(comfy, TF.tiny_dit("flux"), latent_reward(comfy, "flux"), torch.zeros(1, 16, 16, 16))
    message = str(e.value)
    assert "model" in message and "ReNO cannot backpropagate through this model" in message
    assert "SD3" in message and "\n" not in message


def test_safety_guidance_checks_the_latent_before_sampling(comfy):
    model = TF.tiny_dit("wan21")
    guided = comfy.run_node("LatentCLIPSafetyGuidance", model=model, latent_clip=handle(comfy, "wan21"), concepts="cat",
                            scale=0.05).result[0]
    record = guided.model_options["sampler_post_cfg_function"][-1].latent_clip_record
    cond = TF.tiny_dit_conditioning(0, 1)
    for shape, words in (((1, 16, 3, 16, 16), r"^latent_image has 3 latent frames but .*single images"),
                         ((1, 16, 1, 8, 8), r"^latent_image is 8x8, smaller than the 16x16 minimum")):
        with pytest.raises(InputError, match=words):
            comfy.run_node("KSampler", model=guided, seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                           positive=cond, negative=cond, latent_image={"samples": torch.zeros(shape)}, denoise=1.0)
        assert record.runs[-1]["calls"] == 0          # refused before the first model call


def test_reno_checks_head_reward_terms_before_sampling(comfy):
    lc = handle(comfy, "wan21")
    torch.manual_seed(0)
    name = head_file(comfy, "checks-head.safetensors", lambda: Head(lc.load().config["embed_dim"], ["a", "b"]))
    reward = comfy.run_node("LatentCLIPHeadReward", latent_clip=lc, head_name=name, label="a", mode="increase",
                            weight=1.0).result[0]
    model = TF.tiny_dit("wan21")
    with pytest.raises(InputError, match=r"^latent_image has 3 latent frames but"):
        reno(comfy, model, reward, torch.zeros(1, 16, 3, 16, 16))
    with pytest.raises(InputError, match=r"^latent_image is 8x8, smaller than the 16x16 minimum"):
        reno(comfy, model, reward, torch.zeros(1, 16, 1, 8, 8))


def test_families_page_names_only_latent_formats_that_exist(comfy):
    """docs/families.md: every latent format in the table is ComfyUI's or the pack's own (Mini); a
    16-channel 4-D LATENT is scored by any 16-channel 4-D family's Latent-CLIP (their latents look alike)."""
    import comfy.latent_formats as formats
    page = (REPO / "docs" / "families.md").read_text()
    rows = [line.split("|") for line in page.splitlines() if re.match(r"\| `\w+` \| \d+ \|", line)]
    named = {n for row in rows for n in re.findall(r"`(\w+)`", row[5])}
    assert named and all(hasattr(formats, n) or n == "Mini" for n in named), named
    x = torch.randn(1, 16, 32, 32)
    for family in ("sd3", "flux", "mini16"):
        scores = comfy.run_node("LatentCLIPScore", latent_clip=handle(comfy, family), samples={"samples": x},
                                text="a cat").result[0]
        assert len(scores) == 1


def test_safety_guidance_on_a_flow_model_moves_as_much_as_scale_says_at_pure_noise(comfy):
    """scale is the share of the latent's norm moved per step at high noise. A flow model's sigma (SD3, Flux,
    Wan: at most 1) is weighted by its own noise share, s^2 / (s^2 + (1 - s)^2), not the EPS formula, which
    gave half the move at pure noise and a fifth at s = 0.5 (the case of the EPS formula: 0.025 and 0.01)."""
    guided = comfy.run_node("LatentCLIPSafetyGuidance", model=TF.tiny_dit("sd3"), latent_clip=handle(comfy, "sd3"),
                            concepts="cat", scale=0.05).result[0]
    record = guided.model_options["sampler_post_cfg_function"][-1].latent_clip_record
    cond = TF.tiny_dit_conditioning(0, 1)
    comfy.run_node("KSampler", model=guided, seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                   positive=cond, negative=cond, latent_image={"samples": torch.zeros(1, 16, 16, 16)}, denoise=1.0)
    moves = {round(s["sigma"], 2): s["relative_move"][0] for s in record.runs[-1]["steps"]}
    assert moves[1.0] == pytest.approx(0.05, rel=0.05)
    assert moves[0.5] == pytest.approx(0.025, rel=0.05)
