"""ReNO on a MODEL patched with Latent-CLIP safety guidance, inside a real ComfyUI.

The guidance hook moves the CFG-combined x0 at every model call. It must keep the gradient path of
what it moves, or ReNO through a guided MODEL would optimise nothing. The regulariser is off here,
so without that path the noise would get no gradient at all and the loss could not fall.
"""
import json
import sys

import torch

import latentclip
from conftest import tiny_sdxl
from test_reno_nodes import reno_handle, reward_of, run_reno  # noqa: F401  (reno_handle is a fixture)


def reno(comfy, model, handle, iterations=4):
    out = run_reno(comfy, model, reward_of(comfy, handle), {"samples": torch.zeros(2, 4, 32, 32)},
                   iterations=iterations, regularization=0.0)
    best, initial, history, _ = out.result
    return best["samples"], initial["samples"], json.loads(history)


def test_reno_through_a_guided_model_improves_the_reward(comfy, reno_handle):
    handle = reno_handle
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
