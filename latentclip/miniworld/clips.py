"""The two mini-world CLIPs: a pixel CLIP (open_clip ViT on 64x64 RGB) and a Latent-CLIP (the
project's ``LatentCLIP`` on 8x8x4 mini-VAE latents). Both share one text tower config.

The Latent-CLIP is saved with ``latentclip.save`` (open_clip layout, config and VAE family "mini" in
the metadata), so ``latentclip.load`` and the ComfyUI loader read it like any other. The pixel CLIP
is a plain ``open_clip.CLIP`` in its own safetensors file (3-channel ``conv1``; it is a reference
and a reward model, not a Latent-CLIP).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from torch import nn
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from .. import checkpoints as _ckpt
from .files import build_from_metadata, read_tagged
from ..errors import InputError
from ..model import LatentCLIP
from ..pixel_clip import MINI_PIXEL_FORMAT as _PIXEL_FORMAT

#: One text tower for both CLIPs. 16 tokens hold the longest caption (12); the 49408-row token
#: table of open_clip's vocabulary is most of each file, hence the narrow width.
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 4}
EMBED_DIM = 128
#: The Latent-CLIP (also ``weights/configs/mini-latent.json``): 2x2 latent patches -> 4x4 tokens.
LATENT_CFG = {"embed_dim": EMBED_DIM, "vae_family": "mini",
              "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 2,
                             "latent_factor": 8, "latent_channels": 4},
              "text_cfg": TEXT_CFG}
#: The pixel CLIP: 8x8 pixel patches -> 8x8 tokens.
PIXEL_CFG = {"embed_dim": EMBED_DIM,
             "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
             "text_cfg": TEXT_CFG}
PIXEL_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def tokenizer():
    return open_clip.SimpleTokenizer(context_length=TEXT_CFG["context_length"])


class PixelCLIP(nn.Module):
    """open_clip CLIP on 64x64 RGB images in [0, 1] (NCHW); features unnormalised like open_clip's."""

    def __init__(self, cfg: dict | None = None):
        super().__init__()
        self.config = copy.deepcopy(cfg or PIXEL_CFG)
        c = self.config
        self.clip = CLIP(c["embed_dim"], CLIPVisionCfg(**c["vision_cfg"]), CLIPTextCfg(**c["text_cfg"]))
        self.tokenizer = open_clip.SimpleTokenizer(context_length=c["text_cfg"]["context_length"])

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (3, 64, 64):
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a tensor [batch, 3, 64, 64] in [0, 1], got {shape}")
        x = (images - PIXEL_MEAN.to(images)) / PIXEL_STD.to(images)
        return self.clip.encode_image(x.to(self.clip.logit_scale.dtype))

    def encode_text(self, texts) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        return self.clip.encode_text(tokens.to(self.clip.logit_scale.device))


def build(kind: str, vision_overrides: dict | None = None):
    """A freshly initialised CLIP: ``"pixel"`` -> PixelCLIP, ``"latent"`` -> LatentCLIP."""
    cfg = copy.deepcopy(LATENT_CFG if kind == "latent" else PIXEL_CFG)
    cfg["vision_cfg"].update(vision_overrides or {})
    return LatentCLIP(cfg) if kind == "latent" else PixelCLIP(cfg)


def open_clip_model(model) -> CLIP:
    return model.clip


def prepare_inputs(kind: str, inputs, idx) -> torch.Tensor:
    """A training batch from the pool: raw latents for the Latent-CLIP, [0, 1] images for pixels."""
    if kind == "latent":
        return inputs[torch.as_tensor(idx)]
    return torch.from_numpy(inputs[idx]).permute(0, 3, 1, 2).float().div_(255)


def encode_image(model, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "latent":
        return model.encode_latents(x, check=False)
    return model.encode_images(x)


def save_clip(model, kind: str, path, dtype: str = "fp16") -> Path:
    """Latent-CLIP via ``latentclip.save``; the pixel CLIP in open_clip layout with its config."""
    path = Path(path)
    if kind == "latent":
        return _ckpt.save(model, path, dtype=dtype)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    target = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    sd = {k: (v.to(target) if v.is_floating_point() and k != "logit_scale" else v).detach().contiguous().cpu()
          for k, v in model.clip.state_dict().items() if k != "attn_mask"}
    _ckpt.write_safetensors(sd, path, {"format": _PIXEL_FORMAT, "config": json.dumps(model.config)})
    return path


def load_pixel_clip(path, device="cpu") -> PixelCLIP:
    sd, meta = read_tagged(path, _PIXEL_FORMAT, "mini-world pixel CLIP")
    model = build_from_metadata(path, meta, "config", sd, "mini-world pixel CLIP", PixelCLIP)
    return model.to(device).eval().requires_grad_(False)


def load_latent_clip(path, device="cpu") -> LatentCLIP:
    """The shipped Latent-CLIP, through the project's one loader."""
    return _ckpt.load(path, device=device)
