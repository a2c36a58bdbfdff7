"""Reward terms for noise optimisation: per-item LOSSES (lower is better) on raw VAE latents.

Every term maps raw latents ``[B, C, H, W]`` to ``(loss [B], metrics {name: [B]})``; batch items
never mix, so a batch of B noises is optimised as B independent problems. Text features are
encoded once, when a term is built, and stored as ordinary (non-inference) float32 tensors so
autograd can save them even when the term was built under ComfyUI's ``torch.inference_mode``.

Forms and defaults (``s = exp(logit_scale)``, ``cos`` of L2-normalised features):

* ``LatentMatch``: ``weight * (c - s * cos(latent, prompt))``, c = 100, weight = 0.01: ReNO's CLIP
  loss. With a trained CLIP (s = 100) the weighted loss is ``1 - cos``.
* ``LatentAvoid``: ``weight * logsumexp_k(s * cos(latent, concept_k))``, weight = 0.01: for one
  concept this is ``weight * s * cos`` (the mirror image of the match loss); for several it is a
  smooth maximum, so the nearest concept is pushed away hardest. With ``margin`` set, only
  similarity above the margin is penalised: ``weight * s * relu(cos_max_smooth - margin)``.
* ``PixelCLIPMatch``: ReNO's pixel CLIP loss on a differentiably decoded image, same form as
  ``LatentMatch`` (the baseline Latent-CLIP replaces).
* ``LatentHead``: a head (``latentclip.heads``) on the Latent-CLIP's image embedding; ``-log p``
  of a label to raise it ("increase") or ``-log(1 - p)`` to lower it ("decrease"), weight 1.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .errors import InputError

#: ReNO's CLIP loss constant and weight: ``0.01 * (100 - s * cos)``.
MATCH_CONSTANT = 100.0
DEFAULT_WEIGHT = 0.01
#: Temperature of the smooth maximum over several avoid concepts (the zero-shot scale).
SOFTMAX_SCALE = 100.0


def require_trainable_graph(module: torch.nn.Module, name: str) -> None:
    """InputError if ``module`` holds inference tensors: backward through them fails later.

    Models loaded inside ComfyUI's ``torch.inference_mode`` are made of inference tensors; build
    or load them under ``torch.inference_mode(False)`` to use them for rewards or guidance.
    """
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_inference():
            raise InputError(
                f"{name} has weights created under torch.inference_mode, so gradients cannot flow "
                f"through it; load or build it under torch.inference_mode(False)")


def as_normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached copy that is not an inference tensor (autograd may save it for backward)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def normalized_text_features(encode: Callable, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised float32 text features [N, E] from ``encode(texts)``, computed once."""
    with torch.no_grad():
        feats = encode(list(texts))
    return as_normal_tensor(F.normalize(feats.detach().float(), dim=-1))


def _texts(texts, name: str) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts or [])
    if not texts:
        raise InputError(f"{name} is empty; expected at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"{name} #{i + 1} is empty or not a string; expected a prompt")
    return texts


def _weight(weight, name: str) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"{name} weight must be a number, got {weight!r}") from None
    if not torch.isfinite(torch.tensor(w)):
        raise InputError(f"{name} weight must be finite, got {w}")
    return w


def _per_item(feats: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """One row for the whole batch, or one row per batch item."""
    if feats.shape[0] == 1:
        return feats.expand(batch, -1)
    if feats.shape[0] != batch:
        raise InputError(f"{name} has {feats.shape[0]} prompts but the batch has {batch} latents; "
                         f"expected 1 prompt or {batch}")
    return feats


def finite_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Which rows of ``x`` [M, ...] are finite [M] (None: all of them)."""
    finite = torch.isfinite(x.detach().flatten(1)).all(dim=1)
    return None if bool(finite.all()) else finite


def zero_rows(x: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """A new ``x`` whose rows ``finite`` marks False are zeros: what a diverged item (an overflowing fp16
    model) is scored as, since a Latent-CLIP term refuses a batch holding a non-finite latent."""
    keep = finite.to(x.device).view(-1, *[1] * (x.ndim - 1))
    return torch.where(keep, x, torch.zeros_like(x))


def nan_rows(t: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``t`` [M, ...] with the rows ``finite`` marks False set to NaN (never the best, resampling weight 0);
    a value without one row per item (a scalar) is returned as it is."""
    if t.ndim == 0 or t.shape[0] != finite.shape[0]:
        return t
    keep = finite.to(t.device).view(-1, *[1] * (t.ndim - 1))
    return torch.where(keep, t, torch.full_like(t, float("nan")))


class RewardTerm:
    """One reward term. Subclasses implement ``evaluate``; ``weight`` scales ``loss``.

    ``evaluate(latents)`` returns ``(loss [B], metrics)``: the UNWEIGHTED per-item loss (a tensor
    with autograd, lower is better) and a dict of detached per-item diagnostics (e.g. ``cos``).
    """

    name: str = "term"
    weight: float = 1.0

    def evaluate(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, latents: torch.Tensor) -> torch.Tensor:
        """Weighted per-item loss [B]."""
        return self.weight * self.evaluate(latents)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class _LatentCLIPTerm(RewardTerm):
    def __init__(self, model, texts, weight: float, name: str, policy: str):
        require_trainable_graph(model, "the Latent-CLIP model")
        self.model = model
        self.texts = _texts(texts, f"{name} text")
        self.weight = _weight(weight, name)
        self.name = name
        self.policy = policy
        self.text_features = normalized_text_features(model.encode_text, self.texts)
        self.logit_scale = float(model.logit_scale.detach().float().exp())

    def _cosines(self, latents: torch.Tensor) -> torch.Tensor:
        """Cosine of each latent with every stored prompt: [B, N] float32."""
        img = F.normalize(self.model.encode_latents(latents, policy=self.policy).float(), dim=-1)
        return img @ self.text_features.to(img.device).T


class LatentMatch(_LatentCLIPTerm):
    """Pull latents toward a prompt: ``c - s * cos``; one prompt, or one per batch item."""

    def __init__(self, model, texts, weight: float = DEFAULT_WEIGHT, constant: float = MATCH_CONSTANT,
                 name: str = "match", policy: str = "resize"):
        super().__init__(model, texts, weight, name, policy)
        self.constant = float(constant)

    def evaluate(self, latents):
        img = F.normalize(self.model.encode_latents(latents, policy=self.policy).float(), dim=-1)
        txt = _per_item(self.text_features.to(img.device), img.shape[0], f"{self.name} text")
        cos = (img * txt).sum(-1)
        return self.constant - self.logit_scale * cos, {"cos": cos.detach()}


class LatentAvoid(_LatentCLIPTerm):
    """Push latents away from one or more concepts (every concept applies to every item)."""

    def __init__(self, model, concepts, weight: float = DEFAULT_WEIGHT, margin: float | None = None,
                 name: str = "avoid", policy: str = "resize"):
        super().__init__(model, concepts, weight, name, policy)
        if margin is not None and not -1.0 <= float(margin) <= 1.0:
            raise InputError(f"{name} margin must be a cosine in [-1, 1] or None, got {margin}")
        self.margin = None if margin is None else float(margin)

    def evaluate(self, latents):
        cos = self._cosines(latents)                       # [B, K]
        smooth = torch.logsumexp(SOFTMAX_SCALE * cos, dim=-1) / SOFTMAX_SCALE
        if cos.shape[-1] == 1:
            smooth = cos[:, 0]                             # exact for one concept
        if self.margin is None:
            loss = self.logit_scale * smooth
        elif cos.shape[-1] == 1:
            loss = self.logit_scale * F.relu(cos[:, 0] - self.margin)
        else:   # the margin per concept, weighted as the smooth maximum weights them: 0 while every cos is below it
            w = torch.softmax(SOFTMAX_SCALE * cos, dim=-1)
            loss = self.logit_scale * (w * F.relu(cos - self.margin)).sum(-1)
        return loss, {"cos": cos.max(-1).values.detach()}


class PixelCLIPMatch(RewardTerm):
    """ReNO's pixel CLIP loss ``c - s * cos`` on ``decoder(latents)``: the baseline to compare.

    ``decoder`` maps raw latents to images ``[B, 3, H, W]`` differentiably, in [-1, 1] (what a
    VAE's ``decode`` returns; ``image_range="-1,1"``) or [0, 1] (``image_range="0,1"``). Images
    are resized on the shorter side and centre-cropped to the CLIP input size, as ReNO's and CLIP's
    preprocessing do (bilinear, antialiased; theirs is bicubic, a small difference that keeps the
    measured baselines), and normalised with OpenAI CLIP's mean and std. ``clip_model`` is an open_clip model with
    ``encode_image``/``encode_text``; ``tokenizer`` defaults to open_clip's BPE tokenizer.
    """

    def __init__(self, clip_model, decoder: Callable, texts, weight: float = DEFAULT_WEIGHT,
                 constant: float = MATCH_CONSTANT, tokenizer: Callable | None = None,
                 image_range: str = "-1,1", image_size: int | None = None, name: str = "pixel_match"):
        import open_clip
        if not callable(decoder):
            raise InputError(f"{name} decoder must be callable (raw latents -> images), got {type(decoder).__name__}")
        if image_range not in ("-1,1", "0,1"):
            raise InputError(f"{name} image_range must be '-1,1' or '0,1', got {image_range!r}")
        require_trainable_graph(clip_model, "the pixel CLIP model")
        self.clip_model, self.decoder, self.image_range, self.name = clip_model, decoder, image_range, name
        self.texts = _texts(texts, f"{name} text")
        self.weight = _weight(weight, name)
        self.constant = float(constant)
        size = image_size or getattr(getattr(clip_model, "visual", None), "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        tokenizer = tokenizer or open_clip.tokenize
        p = next(clip_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.text_features = normalized_text_features(
            lambda t: clip_model.encode_text(tokenizer(t).to(self.device)), self.texts)
        self.logit_scale = float(clip_model.logit_scale.detach().float().exp())
        self.mean = as_normal_tensor(torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.std = as_normal_tensor(torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images -> CLIP input: [0, 1], resized, normalised, model device and dtype."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.name} decoder must return images [B, 3, H, W], got shape {list(images.shape)}")
        x = images.float()
        if self.image_range == "-1,1":
            x = (x + 1) / 2
        x = x.clamp(0, 1)
        if tuple(x.shape[-2:]) != self.image_size:
            (h, w), (th, tw) = x.shape[-2:], self.image_size
            scale = max(th / h, tw / w)          # the shorter side to its target, the aspect ratio kept
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            top, left = (size[0] - th) // 2, (size[1] - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(device=self.device, dtype=self.dtype)

    def evaluate(self, latents):
        img = F.normalize(self.clip_model.encode_image(self.preprocess(self.decoder(latents))).float(), dim=-1)
        txt = _per_item(self.text_features.to(img.device), img.shape[0], f"{self.name} text")
        cos = (img * txt).sum(-1)
        return self.constant - self.logit_scale * cos, {"cos": cos.detach()}


class LatentHead(RewardTerm):
    """Raise or lower a head's probability of one label: ``-log p`` or ``-log(1 - p)`` per item."""

    MODES = ("increase", "decrease")

    def __init__(self, model, head, label: str, mode: str = "increase", weight: float = 1.0,
                 name: str = "head", policy: str = "resize"):
        from .heads import check_compatible
        require_trainable_graph(model, "the Latent-CLIP model")
        if mode not in self.MODES:
            raise InputError(f"{name} mode must be one of {self.MODES}, got {mode!r}")
        check_compatible(head, model)
        self.model, self.head, self.mode, self.name, self.policy = model, head, mode, name, policy
        self.index = head.label_index(label)
        self.label = label
        self.weight = _weight(weight, name)

    def evaluate(self, latents):
        logp_all = self.head(self.model.encode_latents(latents, policy=self.policy)).float().log_softmax(-1)
        logp = logp_all[:, self.index]
        if self.mode == "increase":
            loss = -logp
        else:   # -log(1 - p) as the log-mass of the other labels: exact, and its gradient never vanishes
            others = torch.cat([logp_all[:, :self.index], logp_all[:, self.index + 1:]], dim=-1)
            loss = -torch.logsumexp(others, dim=-1)
        return loss, {"p": logp.exp().detach()}


class RewardSum:
    """A weighted sum of terms: ``total = sum_i weight_i * loss_i`` per item.

    ``evaluate(latents)`` returns ``(total [B], values)``: ``values`` holds each term's weighted
    loss under its name and each diagnostic as ``"name/metric"``, all detached [B]. Duplicate
    names get a numeric suffix (``match``, ``match_2``).
    """

    def __init__(self, terms):
        if isinstance(terms, RewardSum):
            terms = [t for _, t in terms.terms]
        elif isinstance(terms, RewardTerm):
            terms = [terms]
        terms = list(terms or [])
        if not terms:
            raise InputError("reward has no terms; expected at least one reward term")
        names, self.terms = {}, []
        for t in terms:
            if not isinstance(t, RewardTerm):
                raise InputError(f"reward terms must be RewardTerm objects, got {type(t).__name__}")
            n = names[t.name] = names.get(t.name, 0) + 1
            self.terms.append((t.name if n == 1 else f"{t.name}_{n}", t))

    @property
    def term_list(self) -> list[RewardTerm]:
        return [t for _, t in self.terms]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.terms]

    def __add__(self, other) -> "RewardSum":
        return RewardSum(self.term_list + RewardSum(other).term_list)

    def evaluate(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, values = None, {}
        for name, term in self.terms:
            loss, metrics = term.evaluate(latents)
            if loss.ndim != 1 or loss.shape[0] != latents.shape[0]:
                raise InputError(f"reward term {name!r} returned shape {list(loss.shape)}; expected [{latents.shape[0]}]")
            weighted = term.weight * loss.float().to(latents.device)
            total = weighted if total is None else total + weighted
            values[name] = weighted.detach()
            values.update({f"{name}/{k}": v.detach().float().to(latents.device) for k, v in metrics.items()})
        return total, values

    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.evaluate(latents)

    def __repr__(self) -> str:
        return f"RewardSum({[t for _, t in self.terms]!r})"
