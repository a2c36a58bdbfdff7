"""VAE families as data: which latents a Latent-CLIP reads, and how ComfyUI names them.

A Latent-CLIP reads the latents of one VAE (its *family*): SDXL's 4-channel latents for the
authors' models, 16-channel SD3/Flux/Wan 2.1 latents for a distilled one. Each family is a JSON
file ``weights/families/<name>.json``::

    {"name": "flux", "channels": 16, "factor": 8, "dims": 2,
     "latent_formats": ["Flux"], "description": "FLUX.1 VAE: ..."}

- ``channels``: latent channels; ``factor``: pixels per latent pixel along a side;
- ``dims``: 2 for image VAEs (LATENT samples ``[B, C, H, W]``), 3 for causal video VAEs (Wan):
  ``[B, C, T, H, W]``, an image being one frame (``T == 1``);
- ``latent_formats``: the class names in ComfyUI's ``comfy/latent_formats.py`` whose models make
  these latents (a model's ``latent_format``). Mapping a new format is one more name in the list;
  a new family is one more file.

The raw-latent convention: a Latent-CLIP reads RAW VAE latents, what the VAE's encoder gives and
what a ComfyUI LATENT's ``samples`` hold (VAEEncode's output, VAEDecode's input). Inside a sampler
latents are scaled (``process_latent_in``: SD3/Flux shift and scale, SDXL x0.13025, Wan per-channel
mean/std); convert them back with the model's ``process_latent_out`` before scoring.

A 3-D family's image latent ``[B, C, 1, H, W]`` is read as ``[B, C, H, W]`` (the frame axis
squeezed, a view). Multi-frame latents are refused: a causal video VAE encodes frame 0 alone and
every later latent frame from 4 video frames, a distribution a Latent-CLIP trained on images never
saw, so a per-frame score would look valid without meaning anything.

This module imports neither ComfyUI nor the model; ``configs`` builds on it.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: The pack's data folder (``weights/``, or ``$LATENTCLIP_WEIGHTS``); ``configs`` re-exports it.
WEIGHTS_DIR = Path(os.environ.get("LATENTCLIP_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
FAMILY_DIR = WEIGHTS_DIR / "families"

_NAME = re.compile(r"^[a-z0-9_]{1,16}$")
_FIELDS = {"name": str, "channels": int, "factor": int, "dims": int, "latent_formats": list, "description": str}


@dataclass(frozen=True)
class VaeFamily:
    """One VAE's latent space: ``channels`` x (``H``, ``W`` = pixels / ``factor``), 2-D or 3-D layout."""
    name: str
    channels: int
    factor: int
    dims: int
    latent_formats: tuple[str, ...]
    description: str

    @property
    def layout(self) -> str:
        """The LATENT samples layout of one image, e.g. ``[batch, 16, 1, height, width]``."""
        frame = "1, " if self.dims == 3 else ""
        return f"[batch, {self.channels}, {frame}height, width]"


class FamilyError(ValueError):
    """A family file is malformed (a packaging mistake, named with the file)."""


def _parse(path: Path) -> VaeFamily:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FamilyError(f"VAE family file {path.name!r} could not be read as JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or set(data) != set(_FIELDS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise FamilyError(f"VAE family file {path.name!r} has {got}; expected exactly the keys {sorted(_FIELDS)}")
    for key, kind in _FIELDS.items():
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise FamilyError(f"VAE family file {path.name!r}: {key} is {data[key]!r}; expected a {kind.__name__}")
    problems = [(data["name"] != path.stem or not _NAME.match(data["name"]), "name must be the file's stem "
                 "(lower-case letters, digits, '_', at most 16)"),
                (not 1 <= data["channels"] <= 1024, "channels must be in [1, 1024]"),
                (not 1 <= data["factor"] <= 64, "factor must be in [1, 64]"),
                (data["dims"] not in (2, 3), "dims must be 2 or 3"),
                (not all(isinstance(f, str) and f.isidentifier() for f in data["latent_formats"]),
                 "latent_formats must be ComfyUI latent format class names")]
    for bad, why in problems:
        if bad:
            raise FamilyError(f"VAE family file {path.name!r}: {why}")
    return VaeFamily(data["name"], data["channels"], data["factor"], data["dims"], tuple(data["latent_formats"]),
                     data["description"])


@functools.cache
def _families() -> dict[str, VaeFamily]:
    families = {p.stem: _parse(p) for p in sorted(FAMILY_DIR.glob("*.json"))}
    seen: dict[str, str] = {}
    for fam in families.values():
        for fmt in fam.latent_formats:
            if fmt in seen:
                raise FamilyError(f"latent format {fmt!r} is listed by both VAE families {seen[fmt]!r} and {fam.name!r}")
            seen[fmt] = fam.name
    return families


def family_names() -> list[str]:
    """The names of the known families, sorted."""
    return sorted(_families())


def get_family(name) -> VaeFamily:
    """The family called ``name``; InputError listing the known ones otherwise."""
    fam = _families().get(name) if isinstance(name, str) else None
    if fam is None:
        raise InputError(f"VAE family {name!r} is unknown; expected one of {family_names()}")
    return fam


def family_of_latent_format(class_name: str) -> str | None:
    """The family whose latents a ComfyUI ``latent_format`` class (by name) makes, or None."""
    for fam in _families().values():
        if class_name in fam.latent_formats:
            return fam.name
    return None


def families_with_channels(channels: int, dims: int | None = None) -> list[str]:
    """Names of the families with ``channels`` channels (and ``dims``, when given): who made a latent."""
    return [f.name for f in _families().values() if f.channels == channels and dims in (None, f.dims)]


def image_latents(samples):
    """``[B, C, 1, H, W]`` -> ``[B, C, H, W]`` (a view); any other tensor as it is. No checks."""
    return samples[:, :, 0] if samples.ndim == 5 and samples.shape[2] == 1 else samples


def _names(names: list[str]) -> str:
    names = [n.upper() for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_latents_for_family(samples, family, input_name: str = "samples", channels: int | None = None):
    """``samples`` as image latents ``[B, C, H, W]`` of ``family`` (a view, never a copy), or InputError.

    ``family`` is a VaeFamily or its name; ``channels`` overrides the family's count (a model's own
    tensors decide). A 3-D family's single-frame ``[B, C, 1, H, W]`` loses its frame axis. A latent of
    another family is refused in one sentence naming both when its channel count identifies it.
    """
    import torch

    fam = family if isinstance(family, VaeFamily) else get_family(family)
    want = fam.channels if channels is None else channels
    reads = f"this Latent-CLIP reads {want}-channel {fam.name.upper()}-VAE latents"
    if not isinstance(samples, torch.Tensor):
        raise InputError(f"{input_name} must be a torch.Tensor of shape {fam.layout}, got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise InputError(f"{input_name} holds {samples.dtype} values; expected floating-point raw VAE latents {fam.layout}")
    if samples.ndim not in (4, 5):
        raise InputError(f"{input_name} must have 4 dimensions [batch, channels, height, width]"
                         f"{' (or 5 with one frame)' if fam.dims == 3 else ''}, got shape {list(samples.shape)}")
    if samples.shape[0] == 0:
        raise InputError(f"{input_name} is an empty batch (shape {list(samples.shape)}); expected at least one latent")
    c, video = samples.shape[1], samples.ndim == 5
    if c != want or (video and fam.dims != 3):
        others = [n for n in families_with_channels(c, 3 if video else None) if n != fam.name]
        source = f"the {_names(others)} VAE" if others else "another VAE"
        got = f"is a 5-dimensional {list(samples.shape)} latent" if c == want else f"has {c} channels"
        raise InputError(f"{input_name} {got} but {reads} {fam.layout}; {c}-channel"
                         f"{' 5-dimensional' if video else ''} latents come from {source}: use a Latent-CLIP trained on that VAE")
    if video:
        if samples.shape[2] != 1:
            raise InputError(f"{input_name} has {samples.shape[2]} latent frames but a Latent-CLIP scores single "
                             f"images; expected one frame {fam.layout} (later frames of a causal video VAE hold "
                             "several video frames each)")
    return image_latents(samples)
