"""Per-step safety guidance: move a predicted clean latent away from concepts, in latent space.

One call is one sampler step. Given the predicted clean latent ``x0`` (RAW VAE space, as
Latent-CLIP reads it) the step is, per item i::

    J_i   = smax_k cos(x0_i, concept_k) - smax_a cos(x0_i, anchor_a)    (anchor part if given)
    g_i   = grad of J_i with respect to x0_i
    w     = sigma^2 / (sigma^2 + sigma_data^2)                          (schedule, below)
    move  = min(scale * w, max_move) * ||x0_i||                        (per-item bound)
    x0_i' = x0_i - move * g_i / ||g_i||                                 (only if fired_i)

``smax`` is a smooth maximum, ``logsumexp(100 cos) / 100`` (exactly ``cos`` for one text), so
the nearest concept is pushed hardest and the nearest anchor pulled hardest. ``scale`` is the
fraction of the latent's norm moved per step at high noise; the direction is normalised because
the raw gradient's size varies by orders of magnitude between models and latents.

Schedule: ``w = sigma^2 / (sigma^2 + sigma_data^2)`` is the share of the noisy input's variance
that is noise (sigma_data = 1 in the sampler's scaled space). It is ~1 early (sigma 14.6 for
SDXL: 0.995), 0.5 at sigma = 1 and fades to 0 as sampling ends (sigma 0.03: 0.001), so late
steps that only add detail are left nearly alone. ``sigma`` is the sampler's sigma, a number or
one per item.

Threshold: the concept probability of an item is the softmax(100 * cos) mass on the concepts
among concepts + alternatives (``alternatives`` default to the anchors; the ComfyUI node passes
"an image of no {concept}" prompts when no anchors are given, as the authors' prototype did). An
item is guided ("fired") only while that probability is above ``threshold``; threshold 0 always
fires and needs no alternatives. ``scale == 0`` returns ``x0`` itself, untouched.

Gradients: the step is computed on a detached copy and added to ``x0`` as a constant, so when
``x0`` carries a graph (ReNO optimising noise through a guided MODEL) the result keeps it:
d(new x0)/d(x0) is the identity, and the optimiser sees its reward gradient through every item,
guided or not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .rewards import as_normal_tensor, finite_rows, nan_rows, require_trainable_graph, zero_rows

ZERO_SHOT_SCALE = 100.0
#: Default bound on one step's move, as a fraction of the item's latent norm.
DEFAULT_MAX_MOVE = 0.2


@dataclass
class GuidanceStats:
    """Per-item report of one guidance step (plain lists; ``None`` where not measured)."""
    fired: list[bool]
    weight: list[float]                   # schedule w(sigma)
    move_norm: list[float]                # ||x0' - x0|| per item
    relative_move: list[float]            # move_norm / ||x0||
    concept_cos_before: list[float]       # smooth max over concepts
    concept_cos_after: list[float] | None
    anchor_cos_before: list[float] | None
    anchor_cos_after: list[float] | None
    prob_before: list[float] | None       # concept probability (needs alternatives)
    prob_after: list[float] | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sigma_weight(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """The schedule ``sigma^2 / (sigma^2 + sigma_data^2)``: ~1 at high noise, 0 at sigma 0."""
    s2 = sigma.float() ** 2
    return s2 / (s2 + sigma_data ** 2)


def _smax(cos: torch.Tensor) -> torch.Tensor:
    if cos.shape[-1] == 1:
        return cos[..., 0]
    return torch.logsumexp(ZERO_SHOT_SCALE * cos, dim=-1) / ZERO_SHOT_SCALE


def _embeds(t, name: str, dim: int, device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != dim:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{name} must be text embeddings [count, {dim}] from this Latent-CLIP, got {shape}")
    return F.normalize(as_normal_tensor(t).float().to(device), dim=-1)


def _sigma(sigma, batch: int) -> torch.Tensor:
    s = torch.as_tensor(sigma).detach().float().flatten().cpu()
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch or not torch.isfinite(s).all() or (s < 0).any():
        raise InputError(f"sigma must be a finite number >= 0 or one per batch item ({batch}), got {sigma!r}")
    return as_normal_tensor(s)


def _measure(model, x, concepts, anchors, alternatives, policy):
    """Smooth-max concept/anchor cosines [B] and concept probability [B] (or None)."""
    img = F.normalize(model.encode_latents(x, policy=policy, check=False).float(), dim=-1)
    c_cos = img @ concepts.T
    a_cos = None if anchors is None else img @ anchors.T
    prob = None
    if alternatives is not None:
        logits = ZERO_SHOT_SCALE * torch.cat([c_cos, img @ alternatives.T], dim=-1)
        prob = logits.softmax(-1)[:, :concepts.shape[0]].sum(-1)
    return _smax(c_cos), (None if a_cos is None else _smax(a_cos)), prob


def _lst(t):
    return None if t is None else [float(v) for v in t.detach().cpu()]


def _nan_unless(t, keep):
    """``rewards.nan_rows`` for a statistic that may be absent (None) or have every item kept (``keep`` None)."""
    return t if t is None or keep is None else nan_rows(t, keep)


def safety_guidance(x0: torch.Tensor, model, concept_embeds: torch.Tensor, sigma, scale: float,
                    anchor_embeds: torch.Tensor | None = None, alternative_embeds: torch.Tensor | None = None,
                    threshold: float = 0.0, max_move: float = DEFAULT_MAX_MOVE, sigma_data: float = 1.0,
                    measure_after: bool = True, policy: str = "resize") -> tuple[torch.Tensor, GuidanceStats]:
    """One guidance step on raw latents ``x0`` [B, C, H, W]; returns ``(new x0, GuidanceStats)``.

    concept_embeds [K, E], anchor_embeds [A, E] and alternative_embeds [N, E] are text features
    of this Latent-CLIP (normalised here). The new x0 has x0's dtype and device; items that do not
    fire are bit-identical to x0's; an item with NaN/inf values never fires (its statistics are NaN). Inputs
    are never modified; works inside inference_mode.
    measure_after: run one more (gradient-free) Latent-CLIP pass for the "after" statistics.
    """
    # An item whose x0 diverged (NaN/inf: an fp16 UNet that overflowed) is left as it is and not guided, as the
    # sampler would leave it: refusing it stopped the whole batch with an error naming no input of the user's.
    keep = None
    if isinstance(x0, torch.Tensor) and x0.ndim >= 2 and x0.numel():     # else check_latents names what is wrong
        keep = finite_rows(x0)
    model.check_latents(x0 if keep is None else torch.nan_to_num(x0.detach()), "x0")
    batch = x0.shape[0]
    for name, v, low in (("scale", scale, 0.0), ("max_move", max_move, 0.0), ("sigma_data", sigma_data, 1e-12)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < low:
            raise InputError(f"{name} must be a finite number >= {low}, got {v!r}")
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    sig = _sigma(sigma, batch)
    dim = model.clip.text_projection.shape[-1] if model.clip.text_projection is not None else concept_embeds.shape[-1]

    with torch.inference_mode(False):
        # made under the caller's inference mode: torch.where would save it for backward and autograd refuses that
        keep = None if keep is None else as_normal_tensor(keep)
        device = model.device
        concepts = _embeds(concept_embeds, "concept_embeds", dim, device)
        if concepts is None:
            raise InputError("concept_embeds is missing; expected text embeddings [count, dim] of the concepts")
        anchors = _embeds(anchor_embeds, "anchor_embeds", dim, device)
        alternatives = _embeds(alternative_embeds, "alternative_embeds", dim, device)
        alternatives = anchors if alternatives is None else alternatives
        if threshold > 0 and alternatives is None:
            raise InputError("threshold > 0 needs anchor or alternative prompts to compute the concept "
                             "probability against; give anchors/alternatives or set threshold to 0")
        weight = sigma_weight(sig, sigma_data)
        step = (scale * weight).clamp(max=max_move)            # fraction of ||x0|| per item

        x = as_normal_tensor(x0).float()
        if keep is not None:
            x = zero_rows(x, keep)                             # diverged items read as zeros, reported as NaN
        if scale == 0:
            with torch.no_grad():
                measured = _measure(model, x, concepts, anchors, alternatives, policy)
                c, a, p = (_nan_unless(v, keep) for v in measured)
            zeros = [0.0] * batch
            return x0, GuidanceStats([False] * batch, _lst(weight), zeros, zeros, _lst(c),
                                     _lst(c) if measure_after else None, _lst(a),
                                     _lst(a) if measure_after else None, _lst(p), _lst(p) if measure_after else None)

        require_trainable_graph(model, "the Latent-CLIP model")
        with torch.enable_grad():
            x.requires_grad_(True)
            c_before, a_before, p_before = _measure(model, x, concepts, anchors, alternatives, policy)
            objective = c_before if a_before is None else c_before - a_before
            (grad,) = torch.autograd.grad(objective.sum(), [x])

        fired = step.to(x.device) > 0
        if threshold > 0:
            fired = fired & (p_before.detach().to(x.device) > threshold)
        flat = grad.flatten(1)
        g_norm = flat.norm(dim=1)
        fired = fired & torch.isfinite(g_norm) & (g_norm > 0)
        if keep is not None:
            fired = fired & keep.to(fired.device)
            c_before, a_before, p_before = (_nan_unless(v, keep) for v in (c_before, a_before, p_before))
        x_norm = x.detach().flatten(1).norm(dim=1)
        move = torch.where(fired, step.to(x.device) * x_norm, torch.zeros_like(x_norm))
        direction = grad / g_norm.clamp_min(1e-30).view(-1, *[1] * (grad.ndim - 1))
        delta = -move.view(-1, *[1] * (grad.ndim - 1)) * torch.nan_to_num(direction)
        mask = fired.to(x0.device).view(-1, *[1] * (x0.ndim - 1))
        # x0 plus a constant step, so d(new)/d(x0) is the identity: an optimiser upstream (ReNO through
        # a guided MODEL) keeps the gradient path of the items guidance moves.
        moved = (x0.to(torch.float32) + delta.detach()).to(x0.dtype)
        new = torch.where(mask, moved, x0)

        c_after = a_after = p_after = None
        if measure_after:
            with torch.no_grad():
                after = _measure(model, new if keep is None else zero_rows(new, keep), concepts, anchors,
                                 alternatives, policy)
                c_after, a_after, p_after = (_nan_unless(v, keep) for v in after)
        actual = (new.float() - x0.float()).flatten(1).norm(dim=1)
        if keep is not None:
            actual = zero_rows(actual, keep)                    # NaN - NaN is not a move
        stats = GuidanceStats(fired=[bool(f) for f in fired.cpu()], weight=_lst(weight), move_norm=_lst(actual),
                              relative_move=_lst(actual / x_norm.clamp_min(1e-12).to(actual.device)),
                              concept_cos_before=_lst(c_before), concept_cos_after=_lst(c_after),
                              anchor_cos_before=_lst(a_before), anchor_cos_after=_lst(a_after),
                              prob_before=_lst(p_before), prob_after=_lst(p_after))
        return new, stats
