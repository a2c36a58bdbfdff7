"""--highvram / --gpu-only: the pack's cached models never stay on the GPU once unloaded (issue 20, defect 3).

Under HIGH_VRAM, ComfyUI's UNet offload device is the GPU. The pack caches its Latent-CLIPs and pixel
CLIP at module level between prompts, so with that offload device they were built on the card and
"unloading" them (ComfyUI's free_memory, POST /free) left them there. On this CPU machine
``torch.device("meta")`` stands in for the GPU: the handles must offload to the CPU (where ComfyUI's
unload then moves them) and a model ComfyUI has not loaded must hold nothing on the GPU.
"""
import sys

import pytest
import torch

import latentclip
from conftest import tiny_latent_clip

GPU, CPU = torch.device("meta"), torch.device("cpu")


def bridge(comfy):
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    return sys.modules[reno.__name__.rsplit(".", 1)[0] + ".comfy_bridge"]


@pytest.fixture
def highvram(monkeypatch):
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)
    monkeypatch.setattr(mm, "get_torch_device", lambda: GPU)
    assert mm.unet_offload_device() == GPU       # what ComfyUI itself offloads to in this mode


def devices(model):
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def test_cached_models_are_built_and_offloaded_on_the_cpu_under_highvram(comfy, highvram):
    import open_clip
    import safetensors.torch
    b = bridge(comfy)
    latentclip.save(tiny_latent_clip(seed=11), comfy.models / "latent_clip" / "highvram.safetensors")
    torch.manual_seed(0)
    pixel = open_clip.create_model("ViT-S-32", pretrained=None).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in pixel.items()},
                                str(comfy.models / "open_clip" / "highvram-pixel.safetensors"))
    try:
        for handle in (b.load_latent_clip("highvram.safetensors", dtype="fp32"), b.load_pixel_clip("highvram-pixel.safetensors")):
            assert handle.patcher.load_device == GPU and handle.patcher.offload_device == CPU
            assert devices(handle.patcher.model) == {CPU}          # cached between prompts: nothing on the GPU
    finally:   # the stand-in GPU's handles must not meet later tests in this session
        with b._cache_lock:
            for key in [k for k, h in b._cache.items() if h.patcher.load_device == GPU]:
                del b._cache[key]
