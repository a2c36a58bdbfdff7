"""Latent-CLIP architectures as data.

A config is an open_clip-style dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) plus the
VAE family the model was trained on. ``vision_cfg.image_size`` is in pixels and
``vision_cfg.patch_size`` in latent units, as in the authors' configs; the latent grid is
``image_size / latent_factor / patch_size``. Named configs live in ``weights/configs/*.json``;
configs can also be inferred from a state dict's tensor shapes.

A config that comes with a file is data, never instructions: ``validate_config`` accepts only the
keys and value types the shipped configs and the authors' open_clip Latent-CLIP configs use, within
bounds, so nothing in a downloaded file can make open_clip reach the network (``hf_model_name``,
``timm_model_pretrained``, ``hf_tokenizer_name``) or build modules its tensors do not have
(``attentional_pool``, ``ls_init_value``, ...).
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

WEIGHTS_DIR = Path(os.environ.get("LATENTCLIP_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
CONFIG_DIR = WEIGHTS_DIR / "configs"

#: Head width open_clip uses when a config does not give head counts (all released configs).
DEFAULT_HEAD_WIDTH = 64

#: Latent channel count of each VAE family the project knows.
VAE_FAMILY_CHANNELS = {"sdxl": 4, "sd1": 4, "mini": 4, "mini16": 16, "sd3": 16, "flux": 16}


class ConfigError(ValueError):
    """A config is unknown or does not match the weights it is used with."""


#: The largest config text accepted (the shipped ones are ~400 bytes).
MAX_CONFIG_CHARS = 64 * 1024
_INT, _NUM, _STR = "int", "number", "text"
#: key -> (type, smallest, largest); every other key is refused.
_TOP_KEYS = {"embed_dim": (_INT, 1, 16384), "vae_family": (_STR, 1, 16), "quick_gelu": ("bool", None, None),
             "vision_cfg": ("object", None, None), "text_cfg": ("object", None, None)}
_VISION_KEYS = {"image_size": (_INT, 1, 16384), "layers": (_INT, 1, 256), "width": (_INT, 1, 16384),
                "patch_size": (_INT, 1, 1024), "head_width": (_INT, 1, 16384), "mlp_ratio": (_NUM, 0.0, 64.0),
                "latent_factor": (_INT, 1, 64), "latent_channels": (_INT, 1, 1024),
                "latent_n_channels": (_INT, 1, 1024),
                # the authors' configs name the VAE the tower was trained on: recorded, never downloaded
                "latent_encoder_name": (_STR, 0, 200)}
_TEXT_KEYS = {"context_length": (_INT, 1, 4096), "vocab_size": (_INT, 1, 1_000_000), "width": (_INT, 1, 16384),
              "heads": (_INT, 1, 1024), "layers": (_INT, 1, 256), "mlp_ratio": (_NUM, 0.0, 64.0)}
_REQUIRED = {"": ("embed_dim", "vision_cfg", "text_cfg"), "vision_cfg.": ("image_size", "layers", "width", "patch_size"),
             "text_cfg.": ("context_length", "vocab_size", "width", "layers")}
_WHY_REFUSED = {"hf_model_name": "would download a Hugging Face text model",
                "hf_model_pretrained": "would download a Hugging Face text model",
                "hf_tokenizer_name": "would download a Hugging Face tokenizer",
                "timm_model_name": "would build a timm image tower, fetching its weights when asked",
                "timm_model_pretrained": "would download timm weights",
                "latent_n_decoding_layers": "the authors' partially decoded variants need VAE decoder layers "
                                            "this pack does not build"}


def _check_value(where: str, value, rule) -> None:
    kind, low, high = rule
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "object":
        ok = isinstance(value, dict)
    elif kind == _STR:
        ok = isinstance(value, str) and low <= len(value) <= high
    elif kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        # comparisons only: NaN and inf fail them, and a huge int is never converted to float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high
    if not ok:
        if kind in (_INT, _NUM):
            want = f"an integer in [{low}, {high}]" if kind == _INT else f"a number in ({low}, {high}]"
        else:
            want = {"bool": "true or false", "object": "a JSON object"}.get(kind, f"text of at most {high} characters")
        raise ConfigError(f"{where} is {_brief(value)}; expected {want}")


def _brief(value) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def validate_config(cfg) -> dict:
    """A deep copy of ``cfg`` if it is a Latent-CLIP config made of allowed keys and bounded values.

    Raises ConfigError naming the first key that is unknown, of the wrong type or out of range.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"the config is {_brief(cfg)}; expected a JSON object")
    for prefix, value, rules in (("", cfg, _TOP_KEYS), ("vision_cfg.", cfg.get("vision_cfg"), _VISION_KEYS),
                                 ("text_cfg.", cfg.get("text_cfg"), _TEXT_KEYS)):
        if not isinstance(value, dict):
            continue  # a missing tower is reported below; a wrong type by the top-level rule
        for key, item in value.items():
            if key not in rules:
                why = _WHY_REFUSED.get(key, "a Latent-CLIP config never holds it")
                raise ConfigError(f"{prefix}{key} is not allowed ({why}); a config may hold only "
                                  f"{', '.join(prefix + k for k in rules)}")
            _check_value(prefix + key, item, rules[key])
        for key in _REQUIRED[prefix]:
            if key not in value:
                raise ConfigError(f"{prefix}{key} is missing")
    if "vae_family" in cfg and cfg["vae_family"] not in VAE_FAMILY_CHANNELS:
        raise ConfigError(f"vae_family {_brief(cfg['vae_family'])} is unknown; expected one of {sorted(VAE_FAMILY_CHANNELS)}")
    for tower, heads in head_counts(cfg).items():
        width = cfg[tower]["width"]
        if heads < 1 or width % heads:
            how = ("head_width " + str(cfg[tower].get("head_width", DEFAULT_HEAD_WIDTH))) if tower == "vision_cfg" else f"{heads} heads"
            raise ConfigError(f"{tower} width {width} cannot be split into attention heads of {how}")
    return copy.deepcopy(cfg)


def parse_config(text) -> dict:
    """A validated config from JSON text (as stored in a file's metadata)."""
    if not isinstance(text, str):
        raise ConfigError(f"the config is {_brief(text)}; expected JSON text")
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigError(f"the config is {len(text)} characters long; expected at most {MAX_CONFIG_CHARS}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"the config is not valid JSON{where}") from None
    return validate_config(value)


def list_configs() -> list[str]:
    """Names of the configs shipped in ``weights/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name_or_dict) -> dict:
    """A deep copy of a named config, a config file's content, or a given dict."""
    if isinstance(name_or_dict, dict):
        return copy.deepcopy(name_or_dict)
    path = Path(str(name_or_dict))
    if not (path.suffix == ".json" and path.is_file()):
        path = CONFIG_DIR / f"{name_or_dict}.json"
        if not path.is_file():
            raise ConfigError(f"config {name_or_dict!r} is unknown; expected one of {list_configs()} or a .json file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"config file {path.name!r} could not be read as JSON ({type(e).__name__})") from None


def latent_size(cfg: dict) -> int:
    """Side of the square latent the model was trained on (64 for 512-pixel SDXL models)."""
    v = cfg["vision_cfg"]
    return v["image_size"] // v.get("latent_factor", 8)


def grid_size(cfg: dict) -> int:
    return latent_size(cfg) // cfg["vision_cfg"]["patch_size"]


def _count_blocks(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _shape(sd: dict, key: str, ndim: int) -> tuple:
    """The shape of tensor ``key``, which must exist with ``ndim`` non-empty dimensions."""
    if key not in sd:
        raise ConfigError(f"the weights lack tensor {key!r}, which every Latent-CLIP has")
    shape = tuple(int(n) for n in sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise ConfigError(f"tensor {key!r} has shape {list(shape)}; expected {ndim} non-empty dimensions")
    return shape


def _metadata_value(metadata: dict, key: str, default):
    """``latent_factor`` / ``vae_family`` from file metadata (text) or a config (typed), checked."""
    value = metadata.get(key, default)
    if key == "latent_factor":
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 4:
            value = int(value)
        _check_value("latent_factor", value, _VISION_KEYS["latent_factor"])
    elif value not in VAE_FAMILY_CHANNELS:
        raise ConfigError(f"vae_family {_brief(value)} is unknown; expected one of {sorted(VAE_FAMILY_CHANNELS)}")
    return value


def infer_config(state_dict: dict, metadata: dict | None = None) -> dict:
    """Infer a config from tensor shapes of a state dict in open_clip key layout.

    Head counts are not in the shapes: they come from ``metadata`` (``config`` JSON) when present,
    else open_clip's 64-wide heads. The VAE family comes from metadata, else "sdxl". Only shapes
    are read, so meta tensors (a file's header) work as well as real ones.
    """
    metadata = metadata or {}
    if "config" in metadata:
        raw = metadata["config"]
        cfg = parse_config(raw) if isinstance(raw, str) else validate_config(raw)
        check_config(cfg, state_dict)
        return cfg
    sd = state_dict
    w, c, p, p2 = _shape(sd, "visual.conv1.weight", 4)
    if p != p2:
        raise ConfigError(f"visual.conv1.weight has a {p}x{p2} kernel; expected square patches")
    tokens = _shape(sd, "visual.positional_embedding", 2)[0]
    grid = int(round((tokens - 1) ** 0.5))
    if grid < 1 or grid * grid + 1 != tokens:
        raise ConfigError(f"visual.positional_embedding has {tokens} rows, which is not a square grid plus a class token")
    factor = _metadata_value(metadata, "latent_factor", 8)
    vision_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    v_mlp = _shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2)[0] / w
    vocab, tw = _shape(sd, "token_embedding.weight", 2)
    ctx = _shape(sd, "positional_embedding", 2)[0]
    text_layers = _count_blocks(sd, "transformer.resblocks.")
    t_mlp = _shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", 2)[0] / tw
    embed = _shape(sd, "visual.proj", 2)[1]
    if _shape(sd, "text_projection", 2)[1] != embed:
        raise ConfigError("visual.proj and text_projection disagree on the embedding size")
    vision = {"image_size": grid * p * factor, "layers": vision_layers, "width": w, "patch_size": p,
              "latent_factor": factor, "latent_channels": c}
    if v_mlp != 4.0:
        vision["mlp_ratio"] = v_mlp
    text = {"context_length": ctx, "vocab_size": vocab, "width": tw,
            "heads": max(1, tw // DEFAULT_HEAD_WIDTH), "layers": text_layers}
    if t_mlp != 4.0:
        text["mlp_ratio"] = t_mlp
    family = _metadata_value(metadata, "vae_family", "sdxl")
    return validate_config({"embed_dim": embed, "vae_family": family, "vision_cfg": vision, "text_cfg": text})


def head_counts(cfg: dict) -> dict:
    """Attention heads per tower as open_clip builds them (vision: width // head_width; text: heads, default 8)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {"vision_cfg": v["width"] // v.get("head_width", DEFAULT_HEAD_WIDTH), "text_cfg": t.get("heads", 8)}


def check_config(cfg: dict, state_dict: dict) -> None:
    """Raise ConfigError naming the first field where ``cfg`` and the weights' shapes disagree."""
    cfg = validate_config(cfg)
    v = cfg["vision_cfg"]
    meta = {"latent_factor": v.get("latent_factor", 8), "vae_family": cfg.get("vae_family", "sdxl")}
    inferred = infer_config(state_dict, meta)
    defaults = {"latent_factor": 8, "latent_channels": v.get("latent_n_channels", 4), "mlp_ratio": 4.0}
    for tower in ("vision_cfg", "text_cfg"):
        keys = [k for k in inferred[tower] if k != "heads"] + ["mlp_ratio"]
        for key in dict.fromkeys(keys):
            expected = cfg[tower].get(key, defaults.get(key))
            value = inferred[tower].get(key, defaults.get(key))
            if expected != value:
                raise ConfigError(f"the config says {tower}.{key}={expected} but the weights have {tower}.{key}={value}")
    if cfg["embed_dim"] != inferred["embed_dim"]:
        raise ConfigError(f"the config says embed_dim={cfg['embed_dim']} but the weights have embed_dim={inferred['embed_dim']}")
