"""Latent-CLIP core: a CLIP that reads VAE latents, its checkpoints, scoring, rewards and guidance.

Pure torch + open_clip; never imports ComfyUI. Typical use::

    import latentclip
    model = latentclip.load("epoch_34.pt")          # any supported layout, config inferred
    scores = latentclip.clip_score(model, latents, "a photo of a cat")
"""
from .checkpoints import convert, load, save
from .configs import get_config, infer_config, list_configs
from .errors import CheckpointError, InputError
from .model import LatentCLIP, RESIZE_POLICIES
from .scoring import clip_score, cosine, rank, zero_shot

__all__ = ["LatentCLIP", "load", "save", "convert", "get_config", "infer_config", "list_configs",
           "cosine", "clip_score", "zero_shot", "rank", "InputError", "CheckpointError", "RESIZE_POLICIES"]
