"""Caption-consistent distillation targets: the teacher's image embeddings moved the least so that, under
the teacher's own text tower, every caption true of an image outscores every false one by a margin.

Why: a pixel CLIP's text tower can be nearly blind to word order ("A left of B" and "B left of A" embed
almost alike), and its image embedding of a scene then scores the false wording as high as the true one.
Regressing a student to that embedding pulls it back towards the confusion that a contrastive or relation
term pushes it out of, so the two terms fight and relations are learnt slowly. Moving the target itself,
once and before training, makes the regression carry the caption constraints instead. The move is found
by a few hundred Adam steps on a penalty (hinge on each violated pair, plus ``pull`` times the squared
move), one move per caption set (the images of which the same captions are true), so it costs well under
a second for a pool of tens of thousands.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _violations(scores: torch.Tensor, truth: torch.Tensor, margin: float) -> torch.Tensor:
    """Per image and caption: how far a false caption's score comes within ``margin`` of the lowest true one."""
    lowest_true = scores.masked_fill(~truth, float("inf")).min(1, keepdim=True).values
    return F.relu(margin + scores - lowest_true).masked_fill(truth, 0.0)


def _normalised_violations(scores: torch.Tensor, truth: torch.Tensor, margin: float, row: torch.Tensor,
                           lead: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Per (image ``row[p]``, true caption ``lead[p]``) and caption: how far the lead's score over a false
    caption, divided by the two captions' text distance ``dist[lead[p]]``, falls short of ``margin``; [P, K]."""
    gap = (scores[row, lead].unsqueeze(1) - scores[row]) / dist.clamp(min=1e-6)
    return F.relu(margin - gap).masked_fill(truth[row], 0.0)


def wrong_share(emb: torch.Tensor, text: torch.Tensor, truth: torch.Tensor, margin: float = 0.0) -> float:
    """Share of images (rows of ``emb``, normalised) where some false caption scores within ``margin`` of a true one."""
    v = _violations(emb @ text.T, truth, margin)
    return float((v.amax(1) > 0).float().mean()) if len(emb) else 0.0


def caption_consistent_targets(target: torch.Tensor, text: torch.Tensor, truth: torch.Tensor, margin: float,
                               pull: float = 0.1, iters: int = 500, lr: float = 0.01, normalise_gap: bool = False):
    """Returns (targets, stats). ``target``: [N, D] teacher image embeddings; ``text``: [K, D] normalised
    caption embeddings of the same teacher; ``truth``: [N, K] bool, which captions are true of each image
    (rows without a true caption are left as they are). Images sharing a row of ``truth`` share one move,
    found for their mean embedding: the constraints are the row's, and the mean stands for the images.
    The returned targets are normalised; ``stats`` holds how many moved, the share wrong (by 0) before and
    after, how far they moved (cosine to the teacher's) and the CPU seconds, so a run can report the
    correction's cost with its training's. ``normalise_gap``: every true caption's lead over every false one
    is divided by the two captions' text distance (the most a unit embedding can get), so ``margin`` is a
    lean along the pair's own direction and captions the text tower nearly merges are not asked for a raw
    lead they can only get by moving the target far (``distill_loss.hard_negative_margin``)."""
    if margin < 0 or pull < 0:
        raise ValueError(f"caption-consistent targets need margin >= 0 and pull >= 0, got {margin} and {pull}")
    if truth.shape != (target.shape[0], text.shape[0]):
        raise ValueError(f"truth must be [images, captions] = [{target.shape[0]}, {text.shape[0]}], got {list(truth.shape)}")
    c0 = time.process_time()
    base = F.normalize(target.detach().float(), dim=-1)
    text = text.detach().to(base.device, torch.float32)
    truth = truth.to(base.device)
    has_truth = truth.any(1)
    rows, group = torch.unique(truth[has_truth], dim=0, return_inverse=True)
    mean = F.normalize(base.new_zeros(len(rows), base.shape[1]).index_add_(0, group, base[has_truth]), dim=-1)
    delta = torch.zeros_like(mean, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    if normalise_gap:
        row, lead = rows.nonzero(as_tuple=True)       # every (caption set, true caption) pair
        dist = torch.cdist(text, text)[lead]
    for _ in range(iters):
        e = F.normalize(mean + delta, dim=-1)
        if normalise_gap:
            v = _normalised_violations(e @ text.T, rows, margin, row, lead, dist).sum(1)
            v = base.new_zeros(len(rows)).index_add_(0, row, v)
        else:
            v = _violations(e @ text.T, rows, margin).sum(1)
        loss = 100.0 * v.mean() + pull * delta.pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = base.clone()
    with torch.no_grad():
        out[has_truth] = F.normalize(base[has_truth] + delta[group], dim=-1)
        cos = (out * base).sum(1)[has_truth]
        stats = {"caption_sets": int(len(rows)), "images": int(len(base)), "margin": margin, "pull": pull,
                 "normalised_gap": bool(normalise_gap), "wrong_before": round(wrong_share(base[has_truth], text, truth[has_truth]), 4),
                 "wrong_after": round(wrong_share(out[has_truth], text, truth[has_truth]), 4),
                 "cosine_to_teacher_mean": round(float(cos.mean()), 4) if len(cos) else 1.0,
                 "cosine_to_teacher_min": round(float(cos.min()), 4) if len(cos) else 1.0,
                 "cpu_seconds": round(time.process_time() - c0, 1)}
    return out, stats
