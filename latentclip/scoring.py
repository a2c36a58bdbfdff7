"""Scoring raw VAE latents against text: cosine, CLIPScore, zero-shot, ranking.

All functions take raw latents (NCHW, as ComfyUI's LATENT ``samples`` hold them) and return
float32 tensors on the CPU-independent device of the model. Text embeddings are cached per model
and forgotten when its text weights change (``load_state_dict``, an optimiser step).
"""
from __future__ import annotations

import string

import torch
import torch.nn.functional as F

from .errors import InputError
from .model import LatentCLIP

#: Scale the authors use for zero-shot softmax over cosine similarities.
ZERO_SHOT_SCALE = 100.0


def split_lines(text: str, name: str = "text") -> list[str]:
    """Non-empty stripped lines of a multiline widget; InputError if there are none.

    Only "\n" ends a line (a "\r" before it is stripped): ``str.splitlines`` would also split at
    U+2028, NEL and form feeds pasted inside a prompt, turning one prompt into two."""
    lines = [line.strip() for line in (text or "").split("\n") if line.strip()]
    if not lines:
        raise InputError(f"{name} is empty; expected at least one non-empty line")
    return lines


def check_template(template: str, name: str = "template") -> str:
    """``template`` if it holds exactly one plain ``{}`` (literal braces doubled), else one InputError."""
    literal = "(literal braces are written '{{' and '}}')"
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        raise InputError(f"{name} {template!r} has an unmatched brace; expected '{{}}' where the label goes "
                         f"{literal}") from None
    if not fields:
        raise InputError(f"{name} {template!r} has no '{{}}' where the label goes; expected exactly one")
    if len(fields) > 1:
        raise InputError(f"{name} {template!r} has {len(fields)} placeholders; expected '{{}}' exactly once, "
                         f"where the label goes {literal}")
    field, conv, spec = fields[0]
    if field or conv or spec:
        shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        raise InputError(f"{name} {template!r} has the placeholder {shown!r}; expected a plain '{{}}' where "
                         f"the label goes {literal}")
    return template


def check_distinct(labels: list[str], name: str = "labels", what: str = "label") -> list[str]:
    """``labels`` if it is not empty and no two are the same prompt to the tokenizer (which lowercases and
    collapses spaces); a repeat would split a softmax's mass between the copies and one name in a table."""
    if not labels:
        raise InputError(f"{name} is empty; expected at least one {what}")
    seen = set()
    for label in labels:
        key = " ".join(str(label).split()).lower()
        if key in seen:
            raise InputError(f"{name}: {key!r} is given twice ({what}s are compared ignoring case and spaces); "
                             f"give each {what} once")
        seen.add(key)
    return labels


def check_finite_features(features: torch.Tensor, name: str = "samples") -> torch.Tensor:
    """Features [B, E] if all finite; else one InputError naming the items, so no NaN score reaches a
    ranking (``topk`` puts NaN first) or a report. Safety probabilities skip this: the filter flags them."""
    bad = (~torch.isfinite(features).all(-1)).nonzero().flatten().tolist()
    if bad:
        items = ", ".join(f"#{i}" for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise InputError(f"{name} {items} gave Latent-CLIP features that are not finite (the latent's magnitude "
                         f"overflows the model's arithmetic); expected raw VAE latents of ordinary magnitude")
    return features


def texts_for_batch(texts: list[str], batch: int, name: str = "text") -> list[str]:
    """One prompt for the whole batch, or exactly one per batch item."""
    if len(texts) == 1:
        return texts * batch
    if len(texts) != batch:
        raise InputError(f"{name} has {len(texts)} lines but the batch has {batch} latents; expected 1 line or {batch}")
    return texts


@torch.no_grad()
def embed(model: LatentCLIP, latents: torch.Tensor, texts: list[str], policy: str = "resize"):
    """L2-normalised latent features [B, E] and text features [N, E] in float32."""
    img = F.normalize(model.encode_latents(latents, policy=policy).float(), dim=-1)
    txt = F.normalize(model.encode_text_cached(texts).float(), dim=-1)
    return img, txt


def cosine(model: LatentCLIP, latents: torch.Tensor, texts, policy: str = "resize") -> torch.Tensor:
    """Cosine similarity of each latent with its prompt ([B]); one prompt or one per item."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    texts = texts_for_batch(texts, model.check_latents(latents).shape[0])
    uniq = list(dict.fromkeys(texts))
    img, txt = embed(model, latents, uniq, policy)
    check_finite_features(img)
    idx = torch.tensor([uniq.index(t) for t in texts], device=img.device)
    return (img * txt[idx]).sum(-1)


def clip_score(model: LatentCLIP, latents: torch.Tensor, texts, policy: str = "resize") -> torch.Tensor:
    """CLIPScore-style ``exp(logit_scale) * cos`` per item ([B])."""
    return model.logit_scale.detach().float().exp() * cosine(model, latents, texts, policy)


def zero_shot(model: LatentCLIP, latents: torch.Tensor, labels: list[str], template: str = "{}",
              policy: str = "resize") -> torch.Tensor:
    """Probabilities [B, L] over labels (a string is one label), softmax(100 * cos) as the authors compute them."""
    labels = check_distinct([labels] if isinstance(labels, str) else list(labels), "labels", "label")
    check_template(template)
    img, txt = embed(model, model.check_latents(latents), [template.format(label) for label in labels], policy)
    check_finite_features(img)
    return (ZERO_SHOT_SCALE * img @ txt.T).softmax(-1)


def concept_probabilities(model: LatentCLIP, latents: torch.Tensor, concepts: list[str],
                          policy: str = "resize") -> torch.Tensor:
    """P(concept) [B, K] (a string is one concept): 2-way softmax(100 * cos) of 'an image of c' vs 'an image of no c'.

    The contrast with an explicit negation follows the authors' prototype filter; a threshold on it is
    a score, not a guarantee: CLIP negation is weak and concepts the model never saw are not caught.
    """
    concepts = check_distinct([concepts] if isinstance(concepts, str) else list(concepts), "concepts", "concept")
    prompts = [p for c in concepts for p in (f"an image of {c}", f"an image of no {c}")]
    img, txt = embed(model, model.check_latents(latents), prompts, policy)
    logits = (ZERO_SHOT_SCALE * img @ txt.T).view(img.shape[0], len(concepts), 2)
    return logits.softmax(-1)[..., 0]


def rank(model: LatentCLIP, latents: torch.Tensor, texts, k: int | None = None, policy: str = "resize"):
    """Indices of the k best items by cosine similarity (best first) and all scores ([B])."""
    scores = cosine(model, latents, texts, policy)
    b = scores.shape[0]
    k = b if k is None else k
    if not 1 <= k <= b:
        raise InputError(f"k is {k} but the batch has {b} latents; expected 1 <= k <= {b}")
    # stable: equal scores keep batch order (topk's order among ties varies between builds and devices)
    return torch.sort(scores, descending=True, stable=True).indices[:k], scores
