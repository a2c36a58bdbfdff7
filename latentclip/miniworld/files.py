"""Reading the mini-world's own safetensors files: each carries a ``format`` tag in its metadata."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError


def read_tagged(path, expected_format: str, what: str) -> tuple[dict, dict]:
    """(float32 state dict, metadata) of a file tagged ``expected_format``; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != expected_format:
        raise CheckpointError(f"'{path.name}' is not a {what} file (format {meta.get('format')!r}); "
                              f"expected {expected_format!r}")
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}, meta
