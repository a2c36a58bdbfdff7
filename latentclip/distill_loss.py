"""The distillation objective: a student image tower that reads latents learns a pixel CLIP's space.

Shared by the general trainer (``latentclip.train``) and the mini-world's distilled models, so
both optimise the same thing. Two terms:

- ``cosine_regression``: 1 - cos(student image embedding, teacher image embedding of the same
  image). Needs images only; the teacher's text tower (and every head trained on its image
  embeddings) then applies to the student unchanged.
- ``caption_contrastive``: the CLIP loss of the student's image embeddings against the teacher's
  (frozen) text embeddings of the captions, in both directions. Pixel teachers are weak on
  relations; captions with hard negatives (the same objects, the relation word swapped) add them
  as extra text rows that match no image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_regression(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` between matching rows of ``student`` [B, E] and ``teacher`` [B, E]."""
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {list(student.shape)} and teacher embeddings "
                         f"{list(teacher.shape)} must have the same shape")
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def caption_contrastive(student: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor,
                        hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP loss: row i of ``student`` [B, E] matches row i of ``text`` [B, E].

    ``hard_negatives`` [K, E] are text embeddings that match no image; they join the image->text
    softmax only. ``logit_scale`` is the multiplier itself (``exp`` of open_clip's parameter).
    """
    if student.shape != text.shape:
        raise ValueError(f"student embeddings {list(student.shape)} and caption embeddings "
                         f"{list(text.shape)} must have the same shape")
    img = F.normalize(student.float(), dim=-1)
    txt = F.normalize(text.float(), dim=-1)
    targets = torch.arange(img.shape[0], device=img.device)
    rows = txt if hard_negatives is None else torch.cat([txt, F.normalize(hard_negatives.float(), dim=-1)])
    logits_img = logit_scale * img @ rows.T
    logits_txt = logit_scale * txt @ img.T
    return 0.5 * (F.cross_entropy(logits_img, targets) + F.cross_entropy(logits_txt, targets))


def _check_options(student: torch.Tensor, options: torch.Tensor) -> None:
    if options.dim() != 3 or options.shape[0] != student.shape[0] or options.shape[2] != student.shape[1]:
        raise ValueError(f"options {list(options.shape)} must be [N, K, E] for student embeddings {list(student.shape)}")


def hard_negative_choice(student: torch.Tensor, options: torch.Tensor, logit_scale: float | torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of picking the true caption among its hard negatives, per image.

    ``student`` [N, E]; ``options`` [N, K, E] text embeddings whose column 0 is the true caption and
    columns 1.. its hard negatives (e.g. the same objects with the relation word swapped);
    ``mask`` [N, K] marks the columns that exist (column 0 always). Unlike ``caption_contrastive``,
    whose batch softmax is dominated by easy negatives, this loss is only about the hard ones, so a
    large ``logit_scale`` can separate captions whose text embeddings are nearly parallel.
    """
    _check_options(student, options)
    img = F.normalize(student.float(), dim=-1)
    opt = F.normalize(options.float(), dim=-1)
    logits = logit_scale * torch.einsum("ne,nke->nk", img, opt)
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device).bool(), float("-inf"))   # a mask built on the CPU
    return F.cross_entropy(logits, torch.zeros(img.shape[0], dtype=torch.long, device=img.device))


def hard_negative_margin(student: torch.Tensor, options: torch.Tensor, margin: float,
                         mask: torch.Tensor | None = None, normalise_gap: bool = False) -> torch.Tensor:
    """Hinge on cosines: mean over each image's hard negatives of ``max(0, margin - (cos_true - cos_neg))``.

    Same ``options``/``mask`` layout as ``hard_negative_choice``. It stops pulling once the true caption
    leads each hard negative by ``margin``, so the embedding moves no further from a regression target
    than the distinction needs (a softmax keeps pushing, which costs the other tasks).
    ``normalise_gap``: each gap is divided by ``|t_true - t_neg|``, the most any unit image embedding can
    get, so ``margin`` becomes how far the image leans along the pair's own direction. A text tower that
    nearly merges two captions ("A above B" and "A below B") leaves them a gap a hundred times smaller
    than distinct ones get; unnormalised, both a hinge and a softmax all but ignore such pairs.
    """
    _check_options(student, options)
    img = F.normalize(student.float(), dim=-1)
    opt = F.normalize(options.float(), dim=-1)
    cos = torch.einsum("ne,nke->nk", img, opt)
    gap = cos[:, :1] - cos[:, 1:]
    if normalise_gap:
        gap = gap / (opt[:, :1] - opt[:, 1:]).norm(dim=-1).clamp(min=1e-6)
    hinge = F.relu(margin - gap)
    valid = torch.ones_like(hinge, dtype=torch.bool) if mask is None else mask[:, 1:].to(hinge.device).bool()
    return (hinge * valid).sum() / valid.sum().clamp(min=1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor | None = None,
                 logit_scale: float | torch.Tensor = 100.0, contrastive_weight: float = 0.0,
                 hard_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``cosine_regression`` plus ``contrastive_weight`` x ``caption_contrastive`` (when text is given).

    Returns the loss and a dict of its parts as floats, for logs.
    """
    reg = cosine_regression(student, teacher)
    parts = {"cosine": float(reg.detach())}
    loss = reg
    if contrastive_weight and text is not None:
        con = caption_contrastive(student, text, logit_scale, hard_negatives)
        parts["contrastive"] = float(con.detach())
        loss = loss + contrastive_weight * con
    return loss, parts
