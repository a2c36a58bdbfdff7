"""Latent-CLIP core: a CLIP that reads VAE latents, its checkpoints, scoring, rewards and guidance.

Pure torch + open_clip; never imports ComfyUI. Typical use::

    import latentclip
    model = latentclip.load("epoch_34.pt")          # any supported layout, config inferred
    scores = latentclip.clip_score(model, latents, "a photo of a cat")

Exports are imported on first use, so light submodules (``latentclip.api``, the headless client)
start without loading torch.
"""
import importlib

_EXPORTS = {
    "checkpoints": ["load", "save", "convert"],
    "configs": ["get_config", "infer_config", "list_configs"],
    "errors": ["InputError", "CheckpointError"],
    "model": ["LatentCLIP", "RESIZE_POLICIES"],
    "scoring": ["cosine", "clip_score", "zero_shot", "rank", "concept_probabilities"],
    "rewards": ["RewardTerm", "RewardSum", "LatentMatch", "LatentAvoid", "PixelCLIPMatch"],
    "reno": ["reno_optimize", "ReNOResult", "ReNOStep"],
    "guidance": ["safety_guidance", "GuidanceStats"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'latentclip' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
