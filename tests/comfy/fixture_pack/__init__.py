"""TEST-ONLY ComfyUI node pack (never shipped): what a server test needs but no core node builds.

- ``LatentCLIPTestTinySDXL``: the harness's tiny SDXL-architecture ModelPatcher plus positive and
  negative CONDITIONING, so ReNO and safety guidance can run inside a real server process.
- ``LatentCLIPTestTinyVAE``: a TAESD-architecture VAE with random weights (for Pixel-CLIP rewards).
- ``GET /latentclip_test/stats``: after a garbage collection, how many Latent-CLIPs the pack caches,
  how many live tensors (and how many requiring grad), the bytes held by live nn.Parameters, how many
  extra weight functions the tiny UNets carry (``grad_through_comfy_ops`` must leave none behind),
  and Python object counts. ``?trim=1`` also calls glibc's ``malloc_trim(0)`` so that RSS read right
  after shows memory still held rather than free pages the allocator kept.

With ``LATENTCLIP_TEST_EMULATE_GPU_MOVES=1`` in the environment, loading this pack installs
``tests/comfy/gpu_emulation.py``: every ``Module.to`` under inference mode copies tensors, as a move
to a GPU does (``GET /latentclip_test/stats`` reports ``emulated_gpu_moves``).

comfy_server.ComfyServer(extra_packs=[this folder]) symlinks it into the server's custom_nodes.
"""
import gc
import importlib.util
import os
import sys
import weakref
from pathlib import Path

import torch

def _test_module(module_name: str, file_name: str):
    """A file of tests/comfy imported under a private name (``conftest`` holds the harness)."""
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / file_name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _harness():
    return _test_module("latentclip_tests_comfy_conftest", "conftest.py")


def _emulation():
    return _test_module("latentclip_tests_gpu_emulation", "gpu_emulation.py")


if os.environ.get(_emulation().ENV) == "1":
    _emulation().install()

_built = weakref.WeakSet()   # the tiny UNets made so far (for the stats route)


class LatentCLIPTestTinySDXL:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "build"
    CATEGORY = "latent_clip/testing"

    def build(self, seed):
        h = _harness()
        patcher = h.tiny_sdxl(seed)
        _built.add(patcher.model)
        return patcher, h.tiny_conditioning(seed + 1), h.tiny_conditioning(seed + 2)


class LatentCLIPTestTinyVAE:
    """A real ComfyUI VAE (TAESD architecture, random weights): differentiable and fast."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "latent_clip/testing"

    def build(self, seed):
        import comfy.sd
        import comfy.taesd.taesd as taesd
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode(False):
            net = taesd.TAESD(latent_channels=4)
            sd = {k: torch.randn(v.shape, generator=g) * 0.05 if v.ndim > 1 else torch.zeros_like(v)
                  for k, v in net.state_dict().items() if k.startswith(("taesd_decoder.", "taesd_encoder."))}
        return (comfy.sd.VAE(sd=sd),)


def _pack_bridge():
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").endswith("nodes.comfy_bridge") and hasattr(module, "cached_models"):
            return module
    return None


def malloc_trim() -> bool:
    """Hand the C heap's free pages back to the OS (glibc), so RSS shows what is still held."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def stats(trim: bool = False) -> dict:
    gc.collect()
    grad_tensors, param_bytes, params = 0, 0, 0
    objects = gc.get_objects()
    for obj in objects:
        try:
            if isinstance(obj, torch.Tensor):
                grad_tensors += bool(obj.requires_grad)
                if isinstance(obj, torch.nn.Parameter):
                    params += 1
                    param_bytes += obj.numel() * obj.element_size()
        except Exception:  # objects half torn down by gc
            continue
    extra_functions = sum(len(getattr(m, "weight_function", ())) + len(getattr(m, "bias_function", ()))
                          for model in list(_built) for m in model.modules())
    bridge = _pack_bridge()
    return {"cached_models": bridge.cached_models() if bridge else -1, "grad_tensors": grad_tensors,
            "parameters": params, "parameter_bytes": param_bytes, "unet_extra_functions": extra_functions,
            "tiny_unets_alive": len(_built), "gc_objects": len(objects), "allocated_blocks": sys.getallocatedblocks(),
            "tensors": sum(1 for o in objects if isinstance(o, torch.Tensor)),
            "trimmed": malloc_trim() if trim else None, "emulated_gpu_moves": _emulation().installed(),
            "cached_pixel_clips": bridge.cached_pixel_clips() if bridge else -1,
            "loaded_models": _loaded_models()}


def _loaded_models() -> list:
    """Class names of the models ComfyUI's model management holds loaded."""
    try:
        import comfy.model_management as mm
        return [type(m.model.model).__name__ for m in mm.current_loaded_models if m.model is not None]
    except Exception:
        return []


try:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/latentclip_test/stats")
    async def _stats_route(request):
        return web.json_response(stats(trim=request.query.get("trim") == "1"))
except (ImportError, AttributeError):  # imported outside a server
    pass

NODE_CLASS_MAPPINGS = {"LatentCLIPTestTinySDXL": LatentCLIPTestTinySDXL, "LatentCLIPTestTinyVAE": LatentCLIPTestTinyVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"LatentCLIPTestTinySDXL": "Tiny SDXL (Latent-CLIP tests only)",
                              "LatentCLIPTestTinyVAE": "Tiny TAESD VAE (Latent-CLIP tests only)"}
