"""The judge: a pixel-space checker of mini-world prompts, independent of every CLIP.

Analytic, no training: pixels far from grey (the background is a light tint) are object pixels;
each takes the nearest reference colour; 4-connected components of one colour are objects; an
object's shape comes from two scale-free features: how much of its bounding box it fills (square
~1, circle ~0.79, triangle ~0.5) and how much of its mass lies in the top half (apex-up triangles
~0.25, the others ~0.5). Relations use the same dominant-axis rule as the renderer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import scenes as S

#: Minimum chroma (max - min channel) of an object pixel; backgrounds have <= 28, objects >= 150.
CHROMA_MIN = 75
#: Components smaller than this many pixels are noise (the smallest object covers ~60).
MIN_AREA = 14
_REF = np.array([S.RGB[c] for c in S.COLORS], np.float32)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    x: float
    y: float
    area: int
    fill: float
    top: float


def to_uint8(image) -> np.ndarray:
    """HxWx3 uint8 from a uint8 HWC array or a float CHW/HWC tensor/array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return a


def _components(mask: np.ndarray, poll: Callable[[], None] | None = None) -> np.ndarray:
    """4-connected component labels (0 = none) by vectorised min-label propagation.

    ``poll`` (optional) is called before every propagation pass; it may raise to stop (the pass count grows
    with the objects' size, so a large image takes seconds)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        if poll is not None:
            poll()
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, 0)


def classify_shape(fill: float, top: float) -> str:
    if top < 0.37 or fill < 0.63:
        return "triangle"
    return "square" if fill > 0.885 else "circle"


def detect(image, poll: Callable[[], None] | None = None) -> list[Detection]:
    """Objects in an image, largest first; ``poll`` as in ``_components``."""
    img = to_uint8(image).astype(np.float32)
    chroma = img.max(-1) - img.min(-1)
    obj = chroma >= CHROMA_MIN
    nearest = ((img[:, :, None, :] - _REF) ** 2).sum(-1).argmin(-1)
    out = []
    for ci, color in enumerate(S.COLORS):
        lab = _components(obj & (nearest == ci), poll)
        for v in np.unique(lab[lab > 0]):
            ys, xs = np.nonzero(lab == v)
            area = len(ys)
            if area < MIN_AREA:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
            top = float((ys < (y0 + y1) / 2).sum() + 0.5 * (ys == (y0 + y1) / 2).sum()) / area
            out.append(Detection(color, classify_shape(fill, top), float(xs.mean()) + 0.5, float(ys.mean()) + 0.5,
                                 area, float(fill), top))
    return sorted(out, key=lambda d: -d.area)


def _obj(d: Detection) -> S.Obj:
    return S.Obj(d.shape, d.color, d.x, d.y, 0.0)


def check(image, prompt, poll: Callable[[], None] | None = None) -> dict:
    """For a prompt of the grammar (str or Spec): which of its attributes hold in the image.

    Keys: ``color`` (the named colours are present), ``shape`` (the named shapes are present),
    ``object`` (colour-shape pairs bound correctly, with multiplicity), ``count`` (the scene holds
    exactly the described number of objects), ``relation`` (None unless the prompt has one) and
    ``ok`` (all that apply). ``poll`` (optional, no arguments) is called often while the image is analysed
    and may raise to stop it (the ComfyUI node passes its interrupt check).
    """
    spec = prompt if isinstance(prompt, S.Spec) else S.parse(prompt)
    dets = detect(image, poll)
    return check_detections(dets, spec)


def check_detections(dets: list[Detection], spec: S.Spec) -> dict:
    wanted = [(spec.color, spec.shape)] * spec.count
    if spec.kind == "relation":
        wanted = [(spec.color, spec.shape), (spec.color2, spec.shape2)]
    colors = {d.color for d in dets}
    shapes = {d.shape for d in dets}
    res = {
        "color": all(c is None or c in colors for c, _ in wanted),
        "shape": all(s is None or s in shapes for _, s in wanted),
        "object": _bind(dets, wanted),
        "count": len(dets) == len(wanted),
        "relation": None,
    }
    if spec.kind == "relation":
        res["relation"] = any(
            S.relation_of(_obj(a), _obj(b)) == spec.relation
            for a in dets for b in dets if a is not b
            and S._matches(_obj(a), spec.color, spec.shape) and S._matches(_obj(b), spec.color2, spec.shape2))
    res["ok"] = all(v for v in res.values() if v is not None)
    return res


def _bind(dets, wanted) -> bool:
    """Every wanted (colour, shape) finds its own detection (greedy; specific ones first)."""
    free = list(dets)
    for c, s in sorted(wanted, key=lambda w: (w[0] is None) + (w[1] is None)):
        hit = next((d for d in free if (c is None or d.color == c) and (s is None or d.shape == s)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


def score_against_truth(dets: list[Detection], scene: S.Scene) -> dict:
    """Per-attribute correctness of detections vs the renderer's ground truth (for accuracy tables).

    Each true object is matched to the nearest detection; colour/shape are right when that
    detection's are; count when the numbers agree; relation when the matched pair's relation is
    the true one (relation scenes only).
    """
    match = []
    for o in scene.objects:
        best = min(dets, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2, default=None)
        ok = best is not None and (best.x - o.x) ** 2 + (best.y - o.y) ** 2 <= (o.size + 3) ** 2
        match.append(best if ok else None)
    out = {
        "color": [m is not None and m.color == o.color for m, o in zip(match, scene.objects)],
        "shape": [m is not None and m.shape == o.shape for m, o in zip(match, scene.objects)],
        "count": [len(dets) == len(scene.objects)],
        "relation": [],
    }
    if scene.relation is not None:
        a, rel, b = scene.relation
        ma, mb = match[a], match[b]
        out["relation"] = [ma is not None and mb is not None and ma is not mb and S.relation_of(_obj(ma), _obj(mb)) == rel]
    return out
