"""Nodes review 1204: defects a ComfyUI user hits, each shown on ComfyUI's own loader and nodes.

1. The mini-world's MODEL and VAE sat in plain ModelPatchers: under --novram ComfyUI loads with a
   0.1-byte budget and leaves plain torch layers on the CPU (the meta device stands in for the GPU here).
2. Safety guidance turned start/end_percent into sigmas on the MODEL it was given, not the one that samples.
"""
import sys

import pytest
import torch

from conftest import tiny_conditioning, tiny_reward_handle, tiny_sdxl

META = torch.device("meta")


@pytest.fixture(scope="module")
def handle(comfy):
    return tiny_reward_handle(comfy, "tiny-review-1204.safetensors")


# -- 1. the mini-world's models under a partial load (--novram) ------------------------------------------
def test_mini_world_models_load_whole_under_novram(comfy):
    """--novram makes ComfyUI load every model with a budget of 0.1 byte (``partially_load``); it then casts
    layer by layer only for comfy.ops layers, so plain torch layers (the whole mini-world) stayed on the CPU
    and the first step mixed devices. The meta device stands in for the GPU. (The CLIP is not at risk: under
    --novram ComfyUI puts text encoders on the CPU.)"""
    from latentclip.miniworld import generator as G
    model, clip, vae = comfy.run_node("LatentCLIPMiniWorldLoader", world="mini").result   # fresh models, not cached
    with torch.no_grad():
        seq, pooled, pad = clip.cond_stage_model.encoder(G.tokenize(["a red circle"]))
    for patcher in (model, vae.patcher):
        patcher.partially_load(META, extra_memory=0.1)   # what load_models_gpu does under NO_VRAM
    for name, module in (("MODEL", model.model), ("VAE", vae.first_stage_model)):
        assert {t.device for t in [*module.parameters(), *module.buffers()]} == {META}, name
    generator = model.model.diffusion_model.generator
    v = generator.velocity(torch.empty(1, 4, 8, 8, device=META), torch.ones(1, device=META),
                           (seq.to(META), pooled.to(META), pad.to(META)))
    image = vae.first_stage_model.decode(torch.empty(1, 4, 8, 8, device=META))
    assert v.device == META and image.device == META


# -- 2. safety guidance's start/end percents on the model that samples -----------------------------------
def _first(out):
    return out.result[0] if hasattr(out, "result") else out[0]


def test_guidance_window_follows_a_model_sampling_node_applied_after_it(comfy, handle):
    """start/end_percent were turned into sigmas once, on the MODEL given to the guidance node. A ModelSampling*
    node placed after it (a usual spot: right before the sampler) changes the schedule: here the window became
    sigma 1.6 and up on a flow schedule whose sigmas stop at 1.0, so the guidance silently never fired.
    ComfyUI resolves percents (ControlNet, timestep ranges) on the model that samples; so does the guidance now."""
    guided = comfy.run_node("LatentCLIPSafetyGuidance", model=tiny_sdxl(), latent_clip=handle, concepts="a dog",
                            anchors="", scale=0.1, start_percent=0.0, end_percent=0.5, threshold=0.0).result[0]
    flow = _first(comfy.run_node("ModelSamplingSD3", model=guided, shift=3.0))
    sigmas = _first(comfy.run_node("BasicScheduler", model=flow, scheduler="simple", steps=4, denoise=1.0))
    comfy.run_node("KSampler", model=flow, seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                   positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1),
                   latent_image={"samples": torch.zeros(1, 4, 32, 32)}, denoise=1.0)
    sampling = flow.get_model_object("model_sampling")
    low, high = float(sampling.percent_to_sigma(0.5)), float(sampling.percent_to_sigma(0.0))
    expected = sum(low <= float(s) <= high for s in sigmas[:-1])
    record = sys.modules[comfy.node("LatentCLIPGuidanceReport").__module__].records_of(flow)[0]
    assert 0 < expected < 4 and record.runs[-1]["in_window"] == expected
    report = comfy.run_node("LatentCLIPGuidanceReport", model=flow, samples={"samples": torch.zeros(1, 4, 32, 32)}).result[0]
    assert f"sigma {high:.3g} to {low:.3g}" in report
