"""Reading Latent-CLIP weights safely, whatever the file layout; writing the compact format.

Supported, recognised by content (never by file name; a zip or pickle named .safetensors is refused unread):
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
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import configs as _configs
from .errors import CheckpointError
from .model import LatentCLIP, build_open_clip

#: Key prefixes that are not needed to score latents and are dropped on load.
_DROPPED_PREFIXES = ("visual.vae_encoder.", "visual.vae_quant_conv.", "visual.vae.")
#: Wrapper prefixes (DDP, torch.compile, the pack's own module) removed from every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "clip.")
_AUTHORS_VISUAL = "visual.latent_vit."
_FORMAT_NAME = "latentclip"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}
#: Dtypes torch.isfinite takes as they are (float8 ones are widened first).
_FINITE_CHECKED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEADER_BYTES = 100 * 2**20
_MAX_DIMS = 8
#: A Latent-CLIP has a few hundred tensors (the authors' files ~550 with the VAE encoder); open_clip's
#: largest CLIPs under 1000. Far more is a hostile header, refused before any per-tensor work.
_MAX_TENSORS = 20_000


def non_finite_key(sd: dict) -> str | None:
    """The first floating-point tensor of ``sd`` holding NaN or inf, or None: such a file loads, and every
    score or reward it gives is NaN. A causal ``attn_mask`` holds -inf by design."""
    for key, v in sd.items():
        if v.is_floating_point() and key.rsplit(".", 1)[-1] != "attn_mask" and \
                not torch.isfinite(v if v.dtype in _FINITE_CHECKED else v.float()).all():
            return key
    return None


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
def _check_header_entry(path: Path, name: str, info, data_len: int) -> tuple[int, int]:
    """(start, end) of one tensor entry whose dtype, shape and offsets agree with each other and the file."""
    where = f"{_describe(path)} is truncated or corrupt: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} points outside the file's {data_len} data bytes")
    offsets, dtype, shape = info.get("data_offsets"), info.get("dtype"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        raise CheckpointError(f"{where} points outside the file's {data_len} data bytes")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{_describe(path)} has tensor {name!r} of dtype {str(dtype)[:20]!r}; "
                              f"expected one of {', '.join(_SAFETENSORS_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(type(n) is int and 0 <= n < 2**31 for n in shape) and math.prod(max(n, 1) for n in shape) < 2**48):
        raise CheckpointError(f"{where} has shape {str(shape)[:40]}; expected a list of at most {_MAX_DIMS} sizes "
                              "below 2^31")
    nbytes = _SAFETENSORS_DTYPES[dtype].itemsize
    for n in shape:
        nbytes *= n
    if nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{where} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                              f"{offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (sizes, offsets, dtypes, shapes, metadata) without reading tensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{_describe(path)} is too short to be a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n <= 1 or n > min(size - 8, _MAX_HEADER_BYTES):
            wrong = _not_a_checkpoint(path)   # a .safetensors name on an LFS pointer or a saved /blob/ page
            if wrong:
                raise CheckpointError(f"{_describe(path)} is {wrong}")
            raise CheckpointError(f"{_describe(path)} has a corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointError(f"{_describe(path)} has a safetensors header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{_describe(path)} has a safetensors header that is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{_describe(path)} has safetensors metadata that is not a map of text to text")
    count = len(header) - ("__metadata__" in header)
    if count > _MAX_TENSORS:
        raise CheckpointError(f"{_describe(path)} lists {count} tensors; expected at most {_MAX_TENSORS}")
    data_len = size - 8 - n
    spans = sorted(_check_header_entry(path, name, info, data_len) for name, info in header.items()
                   if name != "__metadata__")
    end = 0
    for start, stop in spans:
        if start != end:
            raise CheckpointError(f"{_describe(path)} is truncated or corrupt: its tensors overlap or leave gaps "
                                  f"(a tensor starts at byte {start}, expected {end})")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt: its tensors hold {end} bytes but the "
                              f"file has {data_len} data bytes")
    return header


def _shapes_from_header(header: dict) -> dict:
    """Meta tensors (shape and dtype, no data) for every tensor a validated header lists."""
    return {name: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device="meta")
            for name, info in header.items() if name != "__metadata__"}


def _read_safetensors_tensors(path: Path, names) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except Exception as e:  # noqa: BLE001 - any failure inside the reader is a broken file
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt and could not be read as safetensors ({first})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    header = read_safetensors_header(path)
    return _read_safetensors_tensors(path, [k for k in header if k != "__metadata__"]), dict(header.get("__metadata__", {}))


def _not_a_checkpoint(path: Path) -> str | None:
    """What a file that is neither a zip nor a pickle is, from its first bytes (the wrong files users
    have: a Git LFS pointer from a clone without LFS, an HTML page saved from a /blob/ URL), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return (f"a Git LFS pointer ({path.stat().st_size} bytes), not the weights; run `git lfs pull` in its "
                "clone or download the file's /resolve/ URL")
    text = head.lstrip().lower()
    if text.startswith(b"<"):
        return "an HTML page, not the weights; download the file's /resolve/ URL, not its /blob/ page"
    return None


def _read_pickle(path: Path):
    wrong = _not_a_checkpoint(path)
    if wrong:
        raise CheckpointError(f"{_describe(path)} is {wrong}") from None
    kwargs = {"map_location": "cpu", "weights_only": True}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True  # optimizer state in training checkpoints is mapped, not read
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        msg = str(e)
        operand = re.search(r"Unsupported operand (\d+)", msg)
        if operand:
            with open(path, "rb") as f:
                pickled = f.read(1) == b"\x80" or zipfile.is_zipfile(path)   # protocol 2+ pickles start with 0x80
            if not pickled:   # a text file, a GGUF, ...: its first byte is no opcode the safe loader reads
                raise CheckpointError(f"{_describe(path)} is not a PyTorch checkpoint or a .safetensors file "
                                      "(it does not start like either)") from None
            raise CheckpointError(f"{_describe(path)} was refused: its pickle uses opcode {operand.group(1)}, which "
                                  "the safe loader does not read and a weights file never needs; expected plain "
                                  "tensors (convert trusted files to .safetensors)") from None
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", msg)
        if found:
            what = next(g for g in found.groups() if g)
            raise CheckpointError(
                f"{_describe(path)} was refused: its pickle asks for {what}, which a weights file never needs; "
                "expected plain tensors (convert trusted files to .safetensors)") from None
        last = [line for line in msg.splitlines() if line.strip()][-2:][0][:160] if msg.strip() else "unreadable pickle"
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt and could not be read as a PyTorch checkpoint ({last})") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails on a damaged file in many ways (EOF, zip, struct, ...)
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{_describe(path)} is truncated or corrupt and could not be read as a PyTorch checkpoint ({first})") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":   # 8-byte header length, then JSON
        return True
    pickled = head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"   # protocol 2+ pickles start with 0x80
    if path.suffix == ".safetensors" and (pickled or zipfile.is_zipfile(path)):
        # refused unread: a .safetensors name promises a file without a pickle
        raise CheckpointError(f"{_describe(path)} is a PyTorch checkpoint (a zip/pickle), not a safetensors file; "
                              "rename it to .pt")
    return path.suffix == ".safetensors"


def _pickled_tensors(path: Path) -> tuple[dict, dict]:
    obj = _read_pickle(path)
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = {k: str(obj[k]) for k in ("epoch", "name") if isinstance(obj.get(k), (str, int, float, np.number))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{_describe(path)} holds no state dict of tensors; expected a Latent-CLIP checkpoint")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    odd = next((k for k in tensors if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{_describe(path)} holds a tensor under the key {str(odd)[:40]!r}; expected text keys")
    odd = next((k for k, v in tensors.items() if v.layout != torch.strided or v.is_meta or v.is_quantized), None)
    if odd is not None:
        kind = "meta" if tensors[odd].is_meta else "quantized" if tensors[odd].is_quantized else str(tensors[odd].layout)
        raise CheckpointError(f"{_describe(path)} stores {odd[:80]!r} as a {kind.replace('torch.', '')} tensor; "
                              "expected plain dense tensors")
    return tensors, meta


def checkpoint_file(path) -> Path:
    """``path`` as a Path if it is an existing file; every reader of checkpoint files starts here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return path


def read_state_dict(path) -> tuple[dict, dict]:
    """Raw tensors and metadata from any supported file, keys untouched."""
    path = checkpoint_file(path)
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _pickled_tensors(path)


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


def normalized_key(key: str) -> str | None:
    """``key`` in open_clip's layout, or None for a weight that is dropped (the frozen VAE encoder)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    if key.startswith(_DROPPED_PREFIXES):
        return None
    if key.startswith(_AUTHORS_VISUAL):
        key = "visual." + key[len(_AUTHORS_VISUAL):]
    return key


def _key_map(keys, source: str = "the state dict") -> dict:
    """open_clip key -> the file's key; two file keys naming one weight are refused, naming both."""
    mapping = {}
    for key in keys:
        new = normalized_key(key)
        if new is None or new == "attn_mask":   # open_clip's causal mask: rebuilt by the model, and -inf above its diagonal
            continue
        if new in mapping:
            raise CheckpointError(
                f"{source} holds both {mapping[new]!r} and {key!r}, which name the same weight {new!r} once the "
                f"{'/'.join(_WRAPPER_PREFIXES)} prefixes are removed; expected one copy of each weight")
        mapping[new] = key
    return mapping


def normalize_state_dict(sd: dict, source: str = "the state dict") -> dict:
    """Map any supported key layout onto open_clip's, dropping the frozen VAE encoder.

    Keys that collide once wrapper prefixes are removed raise CheckpointError naming both."""
    return {new: sd[old] for new, old in _key_map(sd, source).items()}


def _check_latent_clip(sd: dict, path: Path) -> None:
    foreign = describe_foreign(sd)
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "logit_scale")
    missing = [k for k in required if k not in sd]
    if foreign or missing:
        looks = foreign or f"a file without Latent-CLIP weights (missing {', '.join(missing[:3])})"
        raise CheckpointError(f"{_describe(path)} looks like {looks}; expected a Latent-CLIP checkpoint "
                              "(an image tower on VAE latents plus an open_clip text tower)")
    odd = next((k for k, v in sd.items() if not v.dtype.is_floating_point), None)
    if odd is not None:
        raise CheckpointError(f"{_describe(path)} stores {odd!r} as {str(sd[odd].dtype).replace('torch.', '')}; "
                              "expected floating-point weights")


def _expected_shapes(cfg: dict) -> dict:
    """Every weight's shape for ``cfg``, from a model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        reference = build_open_clip(cfg)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "attn_mask"}


def _check_fits(sd: dict, cfg: dict, path: Path) -> None:
    want = _expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want and k != "attn_mask"]
    if missing or unexpected:
        raise CheckpointError(f"{_describe(path)} does not fit the architecture of its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{_describe(path)} stores {k!r} with shape {list(sd[k].shape)}; its config "
                                  f"needs {list(shape)}")


def _resolve_config(sd: dict, meta: dict, config, path: Path) -> dict:
    """The validated config for ``sd``: ``config`` checked against the tensors, else inferred."""
    try:
        if config is None:
            return _configs.infer_config(sd, meta)
        cfg = _configs.validate_config(_configs.get_config(config))
        if "vae_family" in meta and "vae_family" not in (config if isinstance(config, dict) else {}):
            cfg["vae_family"] = meta["vae_family"]
        _configs.check_config(cfg, sd)
        return cfg
    except _configs.ConfigError as e:
        where = ("the config" if config is not None else "its metadata config" if "config" in meta
                 else "the config inferred from its tensors")
        raise CheckpointError(f"{_describe(path)} cannot be loaded with {where}: {e}") from None


# -- public --------------------------------------------------------------------------------------
def _open_checked(path, config=None) -> tuple[dict, dict, dict]:
    """(open_clip-layout tensors, metadata, validated config), every check done before tensor data is read.

    For a .safetensors file the layout, dtypes, shapes and config are checked on the header alone
    (meta tensors); only then are the needed tensors read.
    """
    path = checkpoint_file(path)
    if _is_safetensors(path):
        header = read_safetensors_header(path)
        raw, meta = _shapes_from_header(header), dict(header.get("__metadata__", {}))
    else:
        raw, meta = _pickled_tensors(path)
    keys = _key_map(raw, _describe(path))
    sd = {new: raw[old] for new, old in keys.items()}
    _check_latent_clip(sd, path)
    cfg = _resolve_config(sd, meta, config, path)
    _check_fits(sd, cfg, path)
    if any(v.is_meta for v in sd.values()):
        tensors = _read_safetensors_tensors(path, [keys[k] for k in sd])
        sd = {new: tensors[keys[new]] for new in sd}
    bad = non_finite_key(sd)
    if bad is not None:
        raise CheckpointError(f"{_describe(path)} stores NaN or infinite values in {bad!r}; expected finite weights")
    _check_not_blank(sd, path)
    return sd, meta, cfg


def _check_not_blank(sd: dict, path: Path) -> None:
    """Refuse a tower whose weights are all zero (a truncated download, a placeholder): it would load and
    give every latent, or every prompt, the same features. Real weights stop the scan at the first tensor."""
    def blank(keys):
        return all(not (sd[k] if sd[k].dtype in _FINITE_CHECKED else sd[k].float()).any() for k in keys)
    visual = [k for k in sd if k.startswith("visual.")]
    text = [k for k in sd if not k.startswith("visual.") and k not in ("logit_scale", "attn_mask")]
    blank_visual, blank_text = blank(visual), blank(text)
    if blank_visual or blank_text:
        which = ("every weight" if blank_visual and blank_text else
                 "every image-tower weight (visual.*)" if blank_visual else "every text-tower weight")
        raise CheckpointError(f"{_describe(path)} has {which} zero; expected trained Latent-CLIP weights "
                              "(an incomplete download or a placeholder file?)")


def load_state_dict(path) -> tuple[dict, dict]:
    """Open_clip-layout Latent-CLIP weights and file metadata, validated (config included)."""
    sd, meta, _ = _open_checked(path)
    return sd, meta


def load(path, config=None, device="cpu", dtype=torch.float32) -> LatentCLIP:
    """Load a Latent-CLIP from any supported file.

    ``config``: a config name, dict or .json path; inferred from the tensors (and metadata) when None,
    checked against them when given. Every problem with the file is a CheckpointError naming it.
    The file's text metadata (a distilled model's teacher and steps, the authors' epoch and name) is
    ``model.metadata``.
    """
    path = Path(path)
    sd, meta, cfg = _open_checked(path, config)
    model = LatentCLIP(cfg)
    try:
        missing, unexpected = model.load_open_clip_state_dict(
            {k: v for k, v in sd.items() if k != "attn_mask"}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{_describe(path)} does not fit its config ({str(e).splitlines()[0][:160]})") from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise CheckpointError(f"{_describe(path)} does not fit the inferred architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.source, model.metadata = str(path), dict(meta)
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


class CheckpointWriteError(CheckpointError):
    """A file could not be written (disk full, read-only folder): the folder's problem, not the weights'."""


def _place(tmp: Path, path: Path, replace: bool) -> None:
    """Move the finished ``tmp`` to ``path``. Without ``replace``, a file that appeared at ``path`` meanwhile
    (the user's, or another process's conversion) is kept: a hard link fails atomically if ``path`` exists."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force)") from None
    except OSError:   # no hard links on this file system (FAT, some network mounts): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force)") from None
        os.replace(tmp, path)


def write_safetensors(tensors: dict, path, metadata: dict, replace: bool = True) -> Path:
    """Write a .safetensors atomically (temp file, then rename) with the usual file mode.

    safetensors creates its files 0600; a checkpoint copied into a ComfyUI served by another user
    (a container, a shared models folder) would then be unreadable, so the umask's mode is applied.
    The temp file's name is unique: two processes writing the same file (two ComfyUI instances sharing a
    models folder) would otherwise write into and rename each other's temp file. ``replace=False``: raise
    FileExistsError rather than replace a file that appeared at ``path`` while this one was written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)   # e.g. models/latent_clip, which ComfyUI does not make
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        _place(tmp, path, replace)
    except FileExistsError:
        if tmp is not None:   # mkdir's FileExistsError (a file or broken link in the folder's place) is a write error
            raise
        raise CheckpointWriteError(f"'{path}' could not be written ('{path.parent}' is not a folder); "
                              "expected a writable folder") from None
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointWriteError(f"'{path}' could not be written ({reason}); expected a writable folder") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return path


def save(model: LatentCLIP, out, dtype: str | None = None, force: bool = False, metadata: dict | None = None) -> Path:
    """Write the weights needed to score latents, with config and VAE family in the metadata.

    ``metadata``: more text entries (a distilled model's teacher, data and steps); they cannot
    replace the format, config or family entries."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (use --force)")
    sd = model.open_clip_state_dict()
    target = _DTYPES[dtype] if dtype else None
    tensors = {k: (v.to(target) if target and v.is_floating_point() and k != "logit_scale" else v).detach().contiguous().cpu()
               for k, v in sd.items() if k != "attn_mask"}
    meta = {**(metadata or {}), "format": _FORMAT_NAME, "config": json.dumps(model.config), "vae_family": model.vae_family}
    return write_safetensors(tensors, out, meta, replace=force)


def convert(src, out, dtype: str | None = None, force: bool = False, config=None) -> Path:
    """Convert any supported file (e.g. the authors' epoch_34.pt) to a compact .safetensors, keeping its
    text metadata (config and VAE family are rewritten from the loaded model)."""
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (use --force)")
    model = load(src, config=config)
    return save(model, out, dtype=dtype, force=force, metadata=model.metadata)
