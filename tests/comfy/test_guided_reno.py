"""ReNO on a MODEL patched with Latent-CLIP safety guidance, inside a real ComfyUI.

The guidance hook moves the CFG-combined x0 at every model call. It must keep the gradient path of
what it moves, or ReNO through a guided MODEL would optimise nothing. The regulariser is off here,
so without that path the noise would get no gradient at all and the loss could not fall.
"""
import json
import math
import sys

import pytest
import torch

import latentclip
from conftest import tiny_conditioning, tiny_latent_clip, tiny_sdxl


@pytest.fixture(scope="module")
def handle(comfy):
    model = tiny_latent_clip(seed=3)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    path = comfy.models / "latent_clip" / "tiny-guided-reno.safetensors"
    if not path.exists():
        latentclip.save(model, path)
    return comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]


def reno(comfy, model, handle, iterations=4):
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=0.01).result[0]
    out = comfy.run_node("LatentCLIPReNO", model=model, positive=tiny_conditioning(1, 1),
                         negative=tiny_conditioning(2, 1), latent_image={"samples": torch.zeros(2, 4, 32, 32)},
                         reward=reward, seed=5, iterations=iterations, learning_rate=5.0, optimizer="sgd",
                         grad_clip=0.1, regularization=0.0, steps=1, cfg=1.0)
    best, initial, history, _ = out.result
    return best["samples"], initial["samples"], json.loads(history)


def test_reno_through_a_guided_model_improves_the_reward(comfy, handle):
    unet = tiny_sdxl()
    guided = comfy.run_node("LatentCLIPSafetyGuidance", model=unet, latent_clip=handle, concepts="a dog",
                            anchors="", scale=0.1, start_percent=0.0, end_percent=1.0, threshold=0.0).result[0]
    best, initial, summary = reno(comfy, guided, handle)
    assert all(b < i for b, i in zip(summary["best_loss"], summary["initial_loss"])), summary
    assert all(it >= 1 for it in summary["best_iteration"])
    model = handle.load()
    assert (latentclip.cosine(model, best, "a red fox") > latentclip.cosine(model, initial, "a red fox")).all()

    records = sys.modules[comfy.node("LatentCLIPGuidanceReport").__module__].records_of(guided)
    steps = [s for run in records[0].runs for s in run["steps"]]
    assert len(steps) >= 4 and all(all(s["fired"]) for s in steps)   # guidance acted at every ReNO iteration
    _, plain_initial, _ = reno(comfy, unet, handle, iterations=1)
    assert not torch.equal(plain_initial, initial)                  # and it changed what ReNO optimised
