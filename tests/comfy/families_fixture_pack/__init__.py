"""TEST-ONLY ComfyUI node pack (never shipped): tiny random Flux-, SD3- and Wan-2.1-architecture models.

``LatentCLIPTestTinyDiT`` returns a tiny model built by ComfyUI's own classes (tests/comfy/tiny_families.py)
and positive/negative CONDITIONING for it, so a real server samples 16-channel Flux/SD3/Wan latents.
comfy_server.ComfyServer(extra_packs=[this folder]) symlinks it into the server's custom_nodes.
"""
import importlib.util
import sys
from pathlib import Path


def _tiny_families():
    name = "latentclip_tests_tiny_families"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tiny_families.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class LatentCLIPTestTinyDiT:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"architecture": (list(_tiny_families().ARCHITECTURES),),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "build"
    CATEGORY = "latent_clip/testing"

    def build(self, architecture, seed):
        t = _tiny_families()
        return t.tiny_dit(architecture, seed), t.tiny_dit_conditioning(seed + 1), t.tiny_dit_conditioning(seed + 2)


NODE_CLASS_MAPPINGS = {"LatentCLIPTestTinyDiT": LatentCLIPTestTinyDiT}
NODE_DISPLAY_NAME_MAPPINGS = {"LatentCLIPTestTinyDiT": "Tiny Flux/SD3/Wan model (Latent-CLIP tests only)"}
