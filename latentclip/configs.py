"""Latent-CLIP architectures as data.

A config is an open_clip-style dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) plus the
VAE family the model was trained on. ``vision_cfg.image_size`` is in pixels and
``vision_cfg.patch_size`` in latent units, as in the authors' configs; the latent grid is
``image_size / latent_factor / patch_size``. Named configs live in ``weights/configs/*.json``;
configs can also be inferred from a state dict's tensor shapes.
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
VAE_FAMILY_CHANNELS = {"sdxl": 4, "sd1": 4, "mini": 4, "sd3": 16, "flux": 16}


class ConfigError(ValueError):
    """A config is unknown or does not match the weights it is used with."""


def list_configs() -> list[str]:
    """Names of the configs shipped in ``weights/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name_or_dict) -> dict:
    """A deep copy of a named config, a config file's content, or a given dict."""
    if isinstance(name_or_dict, dict):
        return copy.deepcopy(name_or_dict)
    path = Path(str(name_or_dict))
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    candidate = CONFIG_DIR / f"{name_or_dict}.json"
    if not candidate.is_file():
        raise ConfigError(f"config {name_or_dict!r} is unknown; expected one of {list_configs()} or a .json file")
    return json.loads(candidate.read_text())


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


def infer_config(state_dict: dict, metadata: dict | None = None) -> dict:
    """Infer a config from tensor shapes of a state dict in open_clip key layout.

    Head counts are not in the shapes: they come from ``metadata`` (``config`` JSON) when present,
    else open_clip's 64-wide heads. The VAE family comes from metadata, else "sdxl".
    """
    metadata = metadata or {}
    if "config" in metadata:
        cfg = json.loads(metadata["config"]) if isinstance(metadata["config"], str) else dict(metadata["config"])
        check_config(cfg, state_dict)
        return cfg
    sd = state_dict
    w, c, p, _ = sd["visual.conv1.weight"].shape
    tokens = sd["visual.positional_embedding"].shape[0]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid + 1 != tokens:
        raise ConfigError(f"visual.positional_embedding has {tokens} rows, which is not a square grid plus a class token")
    factor = int(metadata.get("latent_factor", 8))
    vision_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / w
    vocab, tw = sd["token_embedding.weight"].shape
    ctx = sd["positional_embedding"].shape[0]
    text_layers = _count_blocks(sd, "transformer.resblocks.")
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw
    embed = sd["visual.proj"].shape[1]
    if sd["text_projection"].shape[1] != embed:
        raise ConfigError("visual.proj and text_projection disagree on the embedding size")
    vision = {"image_size": grid * p * factor, "layers": vision_layers, "width": int(w), "patch_size": int(p),
              "latent_factor": factor, "latent_channels": int(c)}
    if v_mlp != 4.0:
        vision["mlp_ratio"] = v_mlp
    text = {"context_length": int(ctx), "vocab_size": int(vocab), "width": int(tw),
            "heads": max(1, int(tw) // DEFAULT_HEAD_WIDTH), "layers": text_layers}
    if t_mlp != 4.0:
        text["mlp_ratio"] = t_mlp
    family = metadata.get("vae_family", "sdxl")
    return {"embed_dim": int(embed), "vae_family": family, "vision_cfg": vision, "text_cfg": text}


def check_config(cfg: dict, state_dict: dict) -> None:
    """Raise ConfigError naming the first field where ``cfg`` and the weights' shapes disagree."""
    meta = {"latent_factor": cfg["vision_cfg"].get("latent_factor", 8), "vae_family": cfg.get("vae_family", "sdxl")}
    inferred = infer_config(state_dict, meta)
    want = {"embed_dim": cfg["embed_dim"], **{f"vision_cfg.{k}": cfg["vision_cfg"].get(k) for k in inferred["vision_cfg"]},
            **{f"text_cfg.{k}": cfg["text_cfg"].get(k) for k in inferred["text_cfg"] if k != "heads"}}
    got = {"embed_dim": inferred["embed_dim"], **{f"vision_cfg.{k}": v for k, v in inferred["vision_cfg"].items()},
           **{f"text_cfg.{k}": v for k, v in inferred["text_cfg"].items() if k != "heads"}}
    defaults = {"vision_cfg.latent_factor": 8, "vision_cfg.latent_channels": 4}
    for key, value in got.items():
        expected = want[key] if want[key] is not None else defaults.get(key)
        if expected != value:
            raise ConfigError(f"the config says {key}={expected} but the weights have {key}={value}")
    for tower, width in (("vision_cfg", cfg["vision_cfg"]["width"]), ("text_cfg", cfg["text_cfg"]["width"])):
        heads = cfg[tower].get("heads") or width // cfg[tower].get("head_width", DEFAULT_HEAD_WIDTH)
        if width % heads:
            raise ConfigError(f"{tower} width {width} is not divisible by {heads} heads")
