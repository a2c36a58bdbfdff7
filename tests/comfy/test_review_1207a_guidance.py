"""Review 1207a, Safety Guidance on ComfyUI's KSampler: a batch item whose x0 prediction diverges (NaN/inf, as
an fp16 UNet that overflows on a GPU gives) is left to the sampler as it is, unguided, and the other items are
guided as in a batch without it. Before, the guidance hook refused the whole batch at its first step with
``InputError: x0 contains NaN or infinite values``: every image of the batch was lost, and the error named
no input of the user's graph (without the guidance node, the sampler finishes and only that item is NaN)."""
import pytest
import torch

from conftest import tiny_conditioning, tiny_sdxl

STEPS = 3


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


def diverging(model, item=1):
    """The MODEL with a post-CFG hook (before the guidance's) that makes one item's x0 NaN at every step."""
    m = model.clone()

    def blow_up(args):
        d = args["denoised"].clone()
        d[item] = float("nan")
        return d
    m.set_model_sampler_post_cfg_function(blow_up)
    return m


def ksampler(comfy, model):
    return comfy.run_node("KSampler", model=model, seed=0, steps=STEPS, cfg=1.0, sampler_name="euler",
                          scheduler="normal", positive=tiny_conditioning(1, 2), negative=tiny_conditioning(2, 2),
                          latent_image={"samples": torch.zeros(2, 4, 32, 32)}, denoise=1.0)[0]["samples"]


def guide(comfy, model, handle):
    return comfy.run_node("LatentCLIPSafetyGuidance", model=model, latent_clip=handle, concepts="a dog",
                          anchors="a cat", scale=0.1, start_percent=0.0, end_percent=1.0, threshold=0.0).result[0]


def test_a_diverged_item_leaves_the_rest_of_the_batch_guided(comfy, handle):
    unet = tiny_sdxl()
    guided_clean = ksampler(comfy, guide(comfy, unet, handle))
    unguided = ksampler(comfy, diverging(unet))
    patched = guide(comfy, diverging(unet), handle)
    out = ksampler(comfy, patched)                       # InputError "x0 contains NaN ..." before the fix
    assert out[1].isnan().all() and unguided[1].isnan().all()          # as the sampler leaves it without guidance
    assert torch.allclose(out[0], guided_clean[0], atol=1e-5)          # item 0 guided as in a clean batch
    assert not torch.allclose(out[0], unguided[0], atol=1e-3)          # ... and really guided
    text = comfy.run_node("LatentCLIPGuidanceReport", model=patched, samples={"samples": out}).result[0]
    assert f"item 0: guided {STEPS}/{STEPS} calls" in text and f"item 1: guided 0/{STEPS} calls" in text, text
