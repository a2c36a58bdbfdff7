"""Reading Latent-CLIP weights safely, whatever the file layout; writing the compact format.

Supported, recognised by content (never by file name):
- the authors' open_clip training checkpoints (``epoch_34.pt``: ``{"state_dict": {"module.visual.latent_vit.*",
  "module.visual.vae_encoder.*", ...}, "optimizer": ...}``);
- bare state dicts (``.pt``/``.pth``/``.bin``) and ``.safetensors`` files, in the authors' key layout
  (``visual.latent_vit.*``) or open_clip's (``visual.conv1.weight``, ...), with or without ``module.``.
Pickles are read with ``torch.load(weights_only=True)``; the only extra globals allowed are the numpy
scalar and dtype constructors the authors' pickles contain. Safetensors headers are validated before
any tensor is read.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import configs as _configs
from .errors import CheckpointError
from .model import LatentCLIP

#: Key prefixes that are not needed to score latents and are dropped on load.
_DROPPED_PREFIXES = ("visual.vae_encoder.", "visual.vae_quant_conv.", "visual.vae.")
_AUTHORS_VISUAL = "visual.latent_vit."
_FORMAT_NAME = "latentclip"
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


def _numpy_safe_globals():
    """The numpy globals an open_clip training pickle holds (scalars in its metadata), nothing else."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    numeric = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64"]
    dtype_classes = [type(np.dtype(name)) for name in numeric]  # numpy.dtypes.Float64DType, ...
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtype_classes]


def _describe(path: Path) -> str:
    return f"'{path.name}'"


# -- reading raw tensors -------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (sizes, offsets, dtypes) without reading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{_describe(path)} is too short to be a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n <= 1 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{_describe(path)} has a corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{_describe(path)} has a safetensors header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{_describe(path)} has a safetensors header that is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            ok = info["dtype"] in _SAFETENSORS_DTYPES and 0 <= start <= end <= data_len
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{_describe(path)} is truncated or corrupt: tensor {name!r} points outside the file's {data_len} data bytes")
    return header


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    sd = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    return sd, dict(meta)


def _read_pickle(path: Path):
    kwargs = {"map_location": "cpu", "weights_only": True}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True  # optimizer state in training checkpoints is mapped, not read
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>|Unsupported operand (\d+)", msg)
        if found:
            what = next(g for g in found.groups() if g)
            raise CheckpointError(
                f"{_describe(path)} was refused: its pickle asks for {what}, which a weights file never needs; "
                "expected plain tensors (convert trusted files to .safetensors)") from None
        last = [line for line in msg.splitlines() if line.strip()][-2:][0][:160] if msg.strip() else "unreadable pickle"
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt and could not be read as a PyTorch checkpoint ({last})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt and could not be read as a PyTorch checkpoint ({first})") from None


def read_state_dict(path) -> tuple[dict, dict]:
    """Raw tensors and metadata from any supported file, keys untouched."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # 8-byte header length, then JSON
        return _read_safetensors(path)
    obj = _read_pickle(path)
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = {k: obj[k] for k in ("epoch", "name") if k in obj}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{_describe(path)} holds no state dict of tensors; expected a Latent-CLIP checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, meta


# -- layouts -------------------------------------------------------------------------------------
def describe_foreign(sd: dict) -> str | None:
    """What a state dict that is not a Latent-CLIP looks like, or None if it may be one."""
    keys = list(sd)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys):
        return "a Stable Diffusion checkpoint (UNet/VAE weights)"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
        return "a VAE"
    if any(k.startswith("input_blocks.") or k.startswith("down_blocks.") for k in keys):
        return "a diffusion UNet"
    conv = sd.get("visual.conv1.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] == 3:
        return "a pixel CLIP (its visual.conv1 takes 3 image channels)"
    if any(k.startswith(("visual.trunk.", "visual.layer1.", "visual.stem.")) for k in keys):
        return "a pixel CLIP with a timm/ResNet image tower"
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return "a Hugging Face transformers CLIP"
    return None


def normalize_state_dict(sd: dict) -> dict:
    """Map any supported key layout onto open_clip's, dropping the frozen VAE encoder."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(_DROPPED_PREFIXES):
            continue
        if k.startswith(_AUTHORS_VISUAL):
            k = "visual." + k[len(_AUTHORS_VISUAL):]
        out[k] = v
    return out


def _check_latent_clip(sd: dict, path: Path) -> None:
    foreign = describe_foreign(sd)
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "logit_scale")
    missing = [k for k in required if k not in sd]
    if foreign or missing:
        looks = foreign or f"a file without Latent-CLIP weights (missing {', '.join(missing[:3])})"
        raise CheckpointError(f"{_describe(path)} looks like {looks}; expected a Latent-CLIP checkpoint "
                              "(an image tower on VAE latents plus an open_clip text tower)")


# -- public --------------------------------------------------------------------------------------
def load_state_dict(path) -> tuple[dict, dict]:
    """Open_clip-layout Latent-CLIP weights and file metadata, validated."""
    path = Path(path)
    raw, meta = read_state_dict(path)
    sd = normalize_state_dict(raw)
    _check_latent_clip(sd, path)
    return sd, meta


def load(path, config=None, device="cpu", dtype=torch.float32) -> LatentCLIP:
    """Load a Latent-CLIP from any supported file.

    ``config``: a config name, dict or .json path; inferred from the tensors (and metadata) when None,
    checked against them when given.
    """
    path = Path(path)
    sd, meta = load_state_dict(path)
    try:
        if config is None:
            cfg = _configs.infer_config(sd, meta)
        else:
            cfg = _configs.get_config(config)
            if "vae_family" in meta and "vae_family" not in (config if isinstance(config, dict) else {}):
                cfg["vae_family"] = meta["vae_family"]
            _configs.check_config(cfg, sd)
    except _configs.ConfigError as e:
        raise CheckpointError(f"{_describe(path)} does not match the config: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{_describe(path)} lacks tensor {e} that every Latent-CLIP has") from None
    model = LatentCLIP(cfg)
    missing, unexpected = model.load_open_clip_state_dict(
        {k: v for k, v in sd.items() if k != "attn_mask"}, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise CheckpointError(f"{_describe(path)} does not fit the inferred architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.source = str(path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask changes it, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, path, metadata: dict) -> Path:
    """Write a .safetensors atomically (temp file, then rename) with the usual file mode.

    safetensors creates its files 0600; a checkpoint copied into a ComfyUI served by another user
    (a container, a shared models folder) would then be unreadable, so the umask's mode is applied.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


def save(model: LatentCLIP, out, dtype: str | None = None, force: bool = False) -> Path:
    """Write the weights needed to score latents, with config and VAE family in the metadata."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (use --force)")
    sd = model.open_clip_state_dict()
    target = _DTYPES[dtype] if dtype else None
    tensors = {k: (v.to(target) if target and v.is_floating_point() and k != "logit_scale" else v).detach().contiguous().cpu()
               for k, v in sd.items() if k != "attn_mask"}
    meta = {"format": _FORMAT_NAME, "config": json.dumps(model.config), "vae_family": model.vae_family}
    return write_safetensors(tensors, out, meta)


def convert(src, out, dtype: str | None = None, force: bool = False, config=None) -> Path:
    """Convert any supported file (e.g. the authors' epoch_34.pt) to a compact .safetensors."""
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (use --force)")
    return save(load(src, config=config), out, dtype=dtype, force=force)
