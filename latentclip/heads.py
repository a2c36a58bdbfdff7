"""Heads: small classifiers on a CLIP's image-embedding space, applied to latents through a Latent-CLIP.

A head trained on a pixel CLIP's image embeddings (an aesthetic predictor, a safety classifier, a
scene attribute) works unchanged on a Latent-CLIP distilled from that CLIP, because the student
reproduces the teacher's embedding space: no decode is needed. A head file is a small safetensors
file: a linear layer (or a one-hidden-layer MLP) on L2-normalised embeddings, with metadata naming
its labels, what it predicts and the embedding space it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .checkpoints import read_safetensors_header, write_safetensors
from .errors import CheckpointError, InputError

FORMAT = "latentclip-head"
#: Bounds on what a head file may describe (the file is data: nothing in it may make us allocate more).
MAX_LABELS, MAX_DIM = 4096, 65536


class Head(nn.Module):
    """Logits over ``labels`` from image embeddings [B, E] (normalised here, as CLIP scores them)."""

    def __init__(self, embed_dim: int, labels, hidden: int = 0, what: str = "", space: str = ""):
        super().__init__()
        self.labels = [str(x) for x in labels]
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise InputError(f"a head needs at least two distinct labels, got {self.labels}")
        self.embed_dim, self.hidden, self.what, self.space = int(embed_dim), int(hidden), what, space
        if self.hidden:
            self.net = nn.Sequential(nn.Linear(self.embed_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, len(self.labels)))
        else:
            self.net = nn.Sequential(nn.Linear(self.embed_dim, len(self.labels)))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise InputError(f"the head reads embeddings [batch, {self.embed_dim}], got shape {list(embeddings.shape)}")
        w = self.net[0].weight   # a head on the CPU (load_head's default) also reads a GPU model's embeddings
        return self.net(F.normalize(embeddings.float(), dim=-1).to(w.device, w.dtype)).to(embeddings.device)

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.forward(embeddings).float().softmax(-1)

    def label_index(self, label: str) -> int:
        """Index of ``label``; InputError naming the head's labels otherwise."""
        if label not in self.labels:
            raise InputError(f"label {label!r} is not one of this head's labels {self.labels}")
        return self.labels.index(label)


def model_embed_dim(model) -> int:
    """The embedding width of a Latent-CLIP (or any model with an open_clip ``config``)."""
    cfg = getattr(model, "config", None) or {}
    return int(cfg.get("embed_dim", 0))


def check_compatible(head: Head, model) -> None:
    """Refuse a head whose embedding width differs from the Latent-CLIP's, in one sentence."""
    dim = model_embed_dim(model)
    if dim and dim != head.embed_dim:
        raise InputError(f"the head reads {head.embed_dim}-dimensional embeddings but the Latent-CLIP makes "
                         f"{dim}-dimensional ones; use a head trained on this Latent-CLIP's embedding space")


def latent_probabilities(model, head: Head, latents: torch.Tensor, policy: str = "resize") -> torch.Tensor:
    """Head probabilities [B, K] of raw latents, through the Latent-CLIP's image tower (differentiable)."""
    check_compatible(head, model)
    return head.probabilities(model.encode_latents(latents, policy=policy))


def save_head(head: Head, path, extra: dict | None = None) -> Path:
    """Write a head file (fp32: a few KB); refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    meta = {"format": FORMAT, "labels": json.dumps(head.labels), "embed_dim": str(head.embed_dim),
            "hidden": str(head.hidden), "what": head.what, "space": head.space,
            **{k: str(v) for k, v in (extra or {}).items()}}
    write_safetensors({k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}, path, meta)
    return path


def _int_field(meta: dict, key: str, low: int, high: int, name: str) -> int:
    try:
        value = int(meta.get(key, ""))
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise CheckpointError(f"'{name}' has a metadata {key!r} of {meta.get(key)!r}; expected an integer in [{low}, {high}]")
    return value


def _check_fits_metadata(sd: dict, head: Head, name: str) -> None:
    """Refuse tensors that are missing, extra, of another shape than the metadata implies, or not floats."""
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        which = f"it lacks {missing[0]!r}" if missing else f"it holds an unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"'{name}' does not fit its metadata: {which} (expected {sorted(want)})")
    out = f"net.{len(head.net) - 1}.weight"
    if sd[out].ndim == 2 and sd[out].shape[0] != len(head.labels) and sd[out].shape[1:] == want[out][1:]:
        raise CheckpointError(f"'{name}' does not fit its metadata: its output layer has {sd[out].shape[0]} rows "
                              f"but the metadata lists {len(head.labels)} labels")
    bad = next((k for k in sorted(want) if tuple(sd[k].shape) != want[k]), None)
    if bad is not None:
        raise CheckpointError(f"'{name}' does not fit its metadata: {bad!r} has shape {list(sd[bad].shape)}, "
                              f"expected {list(want[bad])}")
    odd = next((k for k in sorted(sd) if not sd[k].dtype.is_floating_point), None)
    if odd is not None:
        raise CheckpointError(f"'{name}' stores {odd!r} as {str(sd[odd].dtype).replace('torch.', '')}; "
                              "expected floating-point weights")


def load_head(path, device="cpu") -> Head:
    """Read a head file written by ``save_head``; every problem is a CheckpointError naming the file."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"head file {str(path)!r} does not exist")
    meta = read_safetensors_header(path).get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path.name}' is not a head file (format {meta.get('format')!r}); expected {FORMAT!r}")
    try:
        labels = json.loads(meta.get("labels", ""))
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS or not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"'{path.name}' has a metadata 'labels' that is not a list of 2 to {MAX_LABELS} strings")
    dim = _int_field(meta, "embed_dim", 1, MAX_DIM, path.name)
    hidden = _int_field(meta, "hidden", 0, MAX_DIM, path.name)
    try:   # on the meta device: the metadata's widths allocate nothing until the file's tensors are seen to fit
        with torch.device("meta"):
            head = Head(dim, labels, hidden, meta.get("what", ""), meta.get("space", ""))
    except InputError as e:
        raise CheckpointError(f"'{path.name}': {e}") from None
    sd = load_file(str(path))
    _check_fits_metadata(sd, head, path.name)
    head = head.to_empty(device="cpu")
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    if not all(torch.isfinite(v).all() for v in head.state_dict().values()):
        raise CheckpointError(f"'{path.name}' stores NaN or infinite values; expected finite weights")
    return head.to(device).eval().requires_grad_(False)
