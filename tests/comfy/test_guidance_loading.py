"""Safety guidance loads its Latent-CLIP with the UNet, before sampling starts (issue 20, defect 5).

A load of its own at the first guided step, mid-sampling, lets ComfyUI's model management offload
the UNet to make room on a small card (``load_models_gpu`` frees memory without keeping the models
in use). Recorded here: every ``load_models_gpu`` list and every UNet call, in order.
"""
import sys

import torch

from conftest import tiny_conditioning, tiny_sdxl
from gpu_emulation import emulated_moves
from test_gpu_inputs import reno_reward  # noqa: F401  (fixture)


def test_the_latent_clip_is_loaded_with_the_unet_before_the_first_model_call(comfy, reno_reward, monkeypatch):  # noqa: F811
    import comfy.model_management as mm
    handle, events = reno_reward[0], []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **kw: events.append(("load", list(models))) or real(models, *a, **kw))
    unet = tiny_sdxl()
    patched = comfy.run_node("LatentCLIPSafetyGuidance", model=unet, latent_clip=handle, concepts="a dog",
                             anchors="", scale=0.1, start_percent=0.0, end_percent=1.0, threshold=0.0).result[0]
    watched = patched.clone()
    watched.set_model_unet_function_wrapper(lambda apply, a: events.append(("call",)) or apply(a["input"], a["timestep"], **a["c"]))
    with emulated_moves():
        for _ in range(2):
            comfy.run_node("KSampler", model=watched, seed=0, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                           positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1),
                           latent_image={"samples": torch.zeros(1, 4, 32, 32)}, denoise=1.0)
            first_call = next(i for i, e in enumerate(events) if e[0] == "call")
            loads = [e[1] for e in events[:first_call] if e[0] == "load"]
            assert any(any(m.model is handle.patcher.model for m in ms) and any(m.model is unet.model for m in ms)
                       for ms in loads), loads
            assert all(e[0] == "call" for e in events[first_call:]), "a model was loaded mid-sampling"
            events.clear()
    record = sys.modules[comfy.node("LatentCLIPGuidanceReport").__module__].records_of(patched)[0]
    assert [r["in_window"] for r in record.runs] == [3, 3] and [r["loads"] for r in record.runs] == [1, 1]
    assert record.model is None
