"""ReNO nodes inside a real ComfyUI: a tiny SDXL-architecture UNet whose weights are inference tensors."""
import json

import pytest
import torch

import latentclip
from latentclip import configs
from conftest import interrupt_at_progress, tiny_conditioning, tiny_latent_clip, tiny_reward_handle, tiny_sdxl


@pytest.fixture(scope="module")
def reno_handle(comfy):
    """A tiny Latent-CLIP with a trained CLIP's logit scale (100), so rewards have real gradients."""
    return tiny_reward_handle(comfy, "tiny-reno.safetensors", device="cpu")


def reward_of(comfy, handle, text="a red fox", mode="match", weight=0.01, chain=None):
    kw = {"reward": chain} if chain is not None else {}
    return comfy.run_node("LatentCLIPReward", latent_clip=handle, text=text, mode=mode, weight=weight, **kw).result[0]


def run_reno(comfy, model, reward, latent, iterations=4, **kw):
    args = dict(model=model, positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1), latent_image=latent,
                reward=reward, seed=5, iterations=iterations, learning_rate=5.0, optimizer="sgd", grad_clip=0.1,
                regularization=0.01, steps=1, cfg=1.0)
    args.update(kw)
    return comfy.run_node("LatentCLIPReNO", **args)


def test_reno_node_lowers_the_loss_for_every_item(comfy, reno_handle):
    reward = reward_of(comfy, reno_handle)
    latent = {"samples": torch.zeros(2, 4, 32, 32)}
    before = latent["samples"].clone()
    out = run_reno(comfy, tiny_sdxl(), reward, latent)
    best, initial, history, plot = out.result
    summary = json.loads(history)
    assert torch.equal(latent["samples"], before) and set(latent) == {"samples"}
    assert best["samples"].shape == (2, 4, 32, 32) and not best["samples"].requires_grad
    assert all(b < i for b, i in zip(summary["best_loss"], summary["initial_loss"]))
    assert all(it >= 1 for it in summary["best_iteration"])
    assert len(summary["history"]["total"]) == 4 and plot.shape[-1] == 3 and plot.ndim == 4
    model = reno_handle.load()
    cos_best = latentclip.cosine(model, best["samples"], "a red fox")
    cos_init = latentclip.cosine(model, initial["samples"], "a red fox")
    assert (cos_best > cos_init).all()


def test_same_seed_same_result_and_cfg_above_one(comfy, reno_handle):
    reward = reward_of(comfy, reno_handle)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    model = tiny_sdxl()
    a = run_reno(comfy, model, reward, latent, iterations=3, cfg=2.0).result
    b = run_reno(comfy, model, reward, latent, iterations=3, cfg=2.0).result
    assert torch.equal(a[0]["samples"], b[0]["samples"])
    summary = json.loads(a[2])
    assert summary["best_loss"][0] < summary["initial_loss"][0]


def test_sampler_custom_with_reno_sampler_beats_plain_sampling(comfy, reno_handle):
    model = tiny_sdxl()
    reward = reward_of(comfy, reno_handle, text="a blue square")
    sigmas = comfy.run_node("SDTurboScheduler", model=model, steps=1, denoise=1.0)[0]
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    common = dict(model=model, add_noise=True, noise_seed=9, cfg=1.0, positive=tiny_conditioning(1),
                  negative=tiny_conditioning(2), sigmas=sigmas, latent_image=latent)
    plain = comfy.run_node("SamplerCustom", sampler=comfy.run_node("KSamplerSelect", sampler_name="euler")[0], **common)[0]
    reno_sampler = comfy.run_node("LatentCLIPReNOSampler", reward=reward, seed=0, iterations=4, learning_rate=5.0,
                                  optimizer="sgd", grad_clip=0.1, regularization=0.01).result[0]
    optimised = comfy.run_node("SamplerCustom", sampler=reno_sampler, **common)[0]
    handle_model = reno_handle.load()
    assert torch.allclose(reno_sampler.last_result.initial_latents, plain["samples"], rtol=1e-4, atol=1e-3)
    assert latentclip.cosine(handle_model, optimised["samples"], "a blue square") > \
        latentclip.cosine(handle_model, plain["samples"], "a blue square")


def test_avoid_reward_chains_and_lowers_concept_similarity(comfy, reno_handle):
    reward = reward_of(comfy, reno_handle, text="a red fox")
    chained = reward_of(comfy, reno_handle, text="blood\nnudity", mode="avoid", weight=0.05, chain=reward)
    assert len(reward) == 1 and len(chained) == 2  # chaining never mutates the input reward
    best, initial, history, _ = run_reno(comfy, tiny_sdxl(), chained, {"samples": torch.zeros(1, 4, 32, 32)}).result
    terms = json.loads(history)["history"]
    assert "avoid1" in terms and "match0" in terms


def test_interrupt_stops_within_one_iteration(comfy, reno_handle):
    import comfy.model_management as mm
    with interrupt_at_progress(2) as seen, pytest.raises(mm.InterruptProcessingException):
        run_reno(comfy, tiny_sdxl(), reward_of(comfy, reno_handle), {"samples": torch.zeros(1, 4, 32, 32)}, iterations=50)
    assert max(seen) <= 3, seen


def test_wrong_vae_family_is_refused(comfy):
    path = comfy.models / "latent_clip" / "tiny-sd3.safetensors"
    if not path.exists():
        latentclip.save(tiny_latent_clip(seed=4, cfg=configs.for_family("Latent-ViT-Tiny-test", "sd3")), path)
    handle = comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]
    with pytest.raises(ValueError, match="reads SD3-VAE latents but the model makes SDXL latents"):
        run_reno(comfy, tiny_sdxl(), reward_of(comfy, handle), {"samples": torch.zeros(1, 4, 32, 32)}, iterations=2)


def tiny_taesd_vae():
    """A real ComfyUI VAE object (TAESD architecture) with random weights: differentiable and fast."""
    import comfy.sd
    import comfy.taesd.taesd as taesd
    torch.manual_seed(0)
    with torch.inference_mode(False):
        net = taesd.TAESD(latent_channels=4)
        sd = {k: torch.randn_like(v) * 0.05 if v.ndim > 1 else torch.zeros_like(v) for k, v in net.state_dict().items()}
    sd = {k: v for k, v in sd.items() if k.startswith(("taesd_decoder.", "taesd_encoder."))}
    with torch.inference_mode():  # as VAELoader runs
        return comfy.sd.VAE(sd=sd)


def test_pixel_clip_reward_runs_and_lowers_its_loss(comfy, reno_handle):
    import open_clip
    path = comfy.models / "open_clip" / "open_clip_pytorch_model.bin"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), path)
    reward = comfy.run_node("PixelCLIPReward", clip_name=path.name, model_name="", vae=tiny_taesd_vae(),
                            text="a red fox", weight=0.01).result[0]
    mixed = reward_of(comfy, reno_handle, chain=reward)
    _, _, history, _ = run_reno(comfy, tiny_sdxl(), mixed, {"samples": torch.zeros(1, 4, 32, 32)}, iterations=3).result
    summary = json.loads(history)
    assert summary["best_loss"][0] < summary["initial_loss"][0]
    assert "pixel0" in summary["history"] and "match1" in summary["history"]
