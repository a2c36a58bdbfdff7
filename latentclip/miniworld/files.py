"""Reading the mini-world's own safetensors files: each carries a ``format`` tag in its metadata.

They are files like any other (a path can point anywhere), so the same rules hold as for Latent-CLIP
checkpoints: the header is checked before any tensor is read, the metadata that describes the module
is data (parsed, sized on the meta device against what the file holds, then built), and every problem
is a ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..checkpoints import read_safetensors_header
from ..errors import CheckpointError

# what a module built from a malformed config raises before it has any weights
_BUILD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
                 RecursionError, AssertionError, RuntimeError)


def read_tagged(path, expected_format: str, what: str) -> tuple[dict, dict]:
    """(float32 state dict, metadata) of a file tagged ``expected_format``; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {str(path)!r} does not exist")
    meta = read_safetensors_header(path).get("__metadata__", {})
    if meta.get("format") != expected_format:
        raise CheckpointError(f"'{path.name}' is not a {what} file (format {meta.get('format')!r}); "
                              f"expected {expected_format!r}")
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}, meta


def build_from_metadata(path, meta: dict, key: str, sd: dict, what: str, build: Callable) -> torch.nn.Module:
    """``build(json.loads(meta[key]))`` with the file's weights loaded, or CheckpointError naming the file.

    The module is first built on the meta device (no memory) and refused if its parameters, or its
    buffers (a text tower's causal mask grows with the square of its context length), would hold more
    values than the file has, so a metadata config cannot make the reader allocate what the file does
    not carry.
    """
    name = Path(path).name
    try:
        config = json.loads(meta[key])
        with torch.device("meta"):
            probe = build(config)
            size = sum(p.numel() for p in probe.parameters())
            buffers = sum(b.numel() for b in probe.buffers())
    except _BUILD_ERRORS as e:
        raise CheckpointError(f"'{name}' has a metadata {key!r} that does not describe a {what} "
                              f"({type(e).__name__})") from None
    held = sum(t.numel() for t in sd.values())
    if size > held or buffers > held:
        raise CheckpointError(f"'{name}': its metadata {key!r} describes a {what} of {size} weights and {buffers} "
                              f"buffer values but the file holds {held}")
    module = build(config)
    target = getattr(module, "clip", module)   # the pixel CLIP stores its open_clip model's keys
    try:
        missing, unexpected = target.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"'{name}' does not fit its {what} config: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise CheckpointError(f"'{name}' does not fit its {what} config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return module
