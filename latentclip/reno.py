"""ReNO: optimise the initial noise of a (one-step) generator by gradient descent on reward losses.

As in ExplainableML/ReNO (Eyring et al., 2024), generalised to batches: ``noise`` [B, ...] holds B
independent noises; each item's gradient is clipped on its own, each item keeps its own best
latent, and the chi-norm regulariser is per item. ``generator`` is any differentiable callable
``noise -> raw latents [B, C, H, W]`` that treats batch items independently (a ComfyUI node wraps
the UNet's one-step x0 in it). Per iteration::

    x0 = generator(z); L_i = reward_i(x0)              # keep x0_i with the lowest L_i seen
    L_i += regularization * (0.5 r_i^2 - (d - 1) log r_i),  r_i = ||z_i||, d = numel(z_i)
    unless last: grad per item, clip its norm to grad_clip, optimizer step

The regulariser is the negative log density of the norm of a d-dimensional standard Gaussian
(a chi distribution), minimal at r = sqrt(d - 1): it keeps the noise on the shell the generator
was trained on.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint

from .errors import InputError
from .rewards import RewardSum, finite_rows, nan_rows, zero_rows

OPTIMIZERS = ("sgd", "adam")
#: Learning rate used when ``lr`` is None: ReNO's 5.0 for SGD; Adam moves every element by about
#: ``lr`` per step whatever the gradient's size, so it needs a far smaller one.
DEFAULT_LR = {"sgd": 5.0, "adam": 0.01}
#: Adam's epsilon: PyTorch's default. Clipped per-element gradients are ~1e-3 (norm 0.1 over 16k
#: values for a 64x64x4 latent), far above it, so Adam's steps stay ~lr in size.
ADAM_EPS = 1e-8


def checkpoint_layers(module) -> list:
    """The layers whose activations gradient checkpointing recomputes in backward (found by structure,
    so no ComfyUI import is needed).

    A ComfyUI UNet or ControlNet: every layer with weights inside its input, middle and output blocks
    (ResBlocks, SpatialTransformers; the blocks themselves are iterated, never called). A VAE: its decoder's
    ResNet blocks (AutoencoderKL) or its decoder's layers with weights (TAESD). Other models: the
    children of their longest ModuleList (a DiT's transformer blocks).
    """
    has_weights = lambda m: next(m.parameters(), None) is not None  # noqa: E731
    if hasattr(module, "input_blocks"):   # a UNet, or a ControlNet (no output blocks)
        middle = getattr(module, "middle_block", None)
        blocks = [*module.input_blocks, *([] if middle is None else [middle]), *getattr(module, "output_blocks", [])]
        return [layer for block in blocks for layer in block if has_weights(layer)]
    decoder = getattr(module, "decoder", None)
    decoder = getattr(module, "taesd_decoder", None) if decoder is None else decoder
    if decoder is not None and hasattr(decoder, "up") and hasattr(decoder, "mid"):
        return [b for level in decoder.up for b in level.block] + [decoder.mid.block_1, decoder.mid.block_2]
    root = module if decoder is None else decoder
    lists = [m for m in root.modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))]
    longest = max(lists, key=len, default=[])
    return [m for m in longest if has_weights(m)]


def _replaying_dict_arguments(forward, args, kwargs):
    """``forward`` for ``torch.utils.checkpoint``: the recompute sees its dict arguments as the forward did.

    A model may change a dict it hands to every layer while it runs (ComfyUI's UNet sets
    ``transformer_options["block"]`` before each block, and its transformers set ``"block_index"``);
    by backward it holds the last values, so a block-keyed patch (attn1/attn2 replace: IPAdapter,
    regional prompting) would run in the forward but not in the recompute and the gradient would be
    wrong. The dicts' entries at call time are put back for the recompute, and what the model left in
    them after it (a shallow copy: nested objects are shared)."""
    dicts = [a for a in (*args, *kwargs.values()) if isinstance(a, dict)]
    seen = [dict(d) for d in dicts]
    calls = []

    def run(*a, **k):
        if not calls:
            calls.append(1)
            return forward(*a, **k)
        later = [dict(d) for d in dicts]
        for d, state in zip(dicts, seen):
            d.clear()
            d.update(state)
        try:
            return forward(*a, **k)
        finally:
            for d, state in zip(dicts, later):
                d.clear()
                d.update(state)
    return run


@contextlib.contextmanager
def checkpointed(modules):
    """Gradient checkpointing for the duration: each module's activations are recomputed in backward
    instead of stored (one more forward pass, far less memory), with the dict arguments it was called
    with as they were then. Only the instances are patched (an instance ``forward`` attribute), and only
    while grad is enabled; everything is put back on exit."""
    patched = []

    def wrap(forward):
        def checkpointed_forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_replaying_dict_arguments(forward, args, kwargs), *args,
                                                     use_reentrant=False, **kwargs)
        return checkpointed_forward

    try:
        for m in modules:
            if "forward" not in m.__dict__ and all(m is not p for p in patched):
                m.forward = wrap(m.forward)
                patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


@dataclass
class ReNOStep:
    """What the callback sees after each iteration (all tensors detached)."""
    iteration: int            # 0-based
    iterations: int
    latents: torch.Tensor     # this iteration's generator output
    loss: list[float]         # reward loss per item (regulariser excluded)
    best_latents: torch.Tensor
    best_loss: list[float]
    best_iteration: list[int]


@dataclass
class ReNOResult:
    """Best latents and how the run went. ``history[key][iteration][item]`` is plain floats."""
    latents: torch.Tensor             # best raw latents per item
    initial_latents: torch.Tensor     # generator output for the un-optimised noise
    noise: torch.Tensor               # the noise that produced ``latents``, per item
    initial_noise: torch.Tensor
    best_iteration: list[int]
    best_loss: list[float]
    initial_loss: list[float]
    iterations_run: int
    stopped_early: bool
    seconds_per_iteration: float
    history: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (no tensors)."""
        return {"best_iteration": self.best_iteration, "best_loss": self.best_loss,
                "initial_loss": self.initial_loss, "iterations_run": self.iterations_run,
                "stopped_early": self.stopped_early, "seconds_per_iteration": self.seconds_per_iteration,
                "history": self.history}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def chi_regularizer(noise: torch.Tensor) -> torch.Tensor:
    """Per-item ``0.5 r^2 - (d - 1) log r`` (negative log chi_d density up to a constant) [B]."""
    d = noise[0].numel()
    r = noise.flatten(1).float().norm(dim=1)
    return 0.5 * r ** 2 - (d - 1) * torch.log(r)


def _number(value, name: str, low: float, low_inclusive: bool, high: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v >= low if low_inclusive else v > low) and (high is None or v < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and < {high}")
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def _validate(generator, noise, iterations, optimizer, callback):
    if not callable(generator):
        raise InputError(f"generator must be callable (noise -> raw latents), got {type(generator).__name__}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 1 or noise[0].numel() < 2:
        shape = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise InputError(f"noise must be a tensor [batch, ...] with at least one item of 2+ values, got {shape}")
    if not noise.is_floating_point():
        raise InputError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if not torch.isfinite(noise).all():
        raise InputError("noise contains NaN or infinite values; expected finite Gaussian noise")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"iterations must be an integer >= 1, got {iterations!r}")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable or None, got {type(callback).__name__}")


def _clip_per_item(grad: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero non-finite item gradients, then scale each item's gradient to norm <= max_norm."""
    norms = grad.flatten(1).float().norm(dim=1)
    finite = torch.isfinite(norms)
    grad = torch.where(finite.view(-1, *[1] * (grad.ndim - 1)), grad, torch.zeros_like(grad))
    norms = torch.where(finite, norms, torch.zeros_like(norms))
    if max_norm > 0:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        grad = grad * coef.view(-1, *[1] * (grad.ndim - 1)).to(grad.dtype)
    return grad, norms


def _finite_items(x0: torch.Tensor, iteration: int) -> torch.Tensor | None:
    """Which items of the generator's output are finite [B] (None: all of them).

    For the initial noise a non-finite item is an error: the un-optimised noise is the caller's (checked
    finite), so the generator itself fails (a NaN cfg, an overflowing half-precision model) and ReNO, whose
    step for that item is zero, would only return NaN latents as the best. Later, an overflow on an optimised
    noise only costs that item that iteration (``_evaluate_finite``)."""
    finite = finite_rows(x0)
    if finite is not None and iteration == 0:
        bad = [i + 1 for i in torch.nonzero(~finite).flatten().tolist()]
        raise InputError(f"the generator's output for the initial noise contains NaN or infinite values (item "
                         f"{', '.join(map(str, bad))} of {x0.shape[0]}); expected finite raw latents: check the model, "
                         f"its dtype and the sampling settings (cfg)")
    return finite


def _evaluate_finite(reward: RewardSum, x0: torch.Tensor, finite: torch.Tensor | None):
    """``reward.evaluate(x0)`` where the items ``finite`` marks False score NaN (never the best; their
    gradient is non-finite and zeroed by ``_clip_per_item``) instead of reaching the reward models: a
    Latent-CLIP refuses non-finite latents, which ended the run for every item of the batch."""
    if finite is None:
        return reward.evaluate(x0)
    total, values = reward.evaluate(zero_rows(x0, finite))
    return nan_rows(total, finite), {k: nan_rows(v, finite) for k, v in values.items()}


@contextlib.contextmanager
def _inference_tensor_hint():
    """Turn autograd's inference-tensor RuntimeError into an InputError that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if "nference tensor" in str(e):
            raise InputError("the generator or a reward model uses weights created under "
                             "torch.inference_mode, so gradients cannot flow through it; load or patch "
                             "it for grad mode (clone its weights outside inference mode)") from e
        raise


def reno_optimize(generator: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, reward,
                  iterations: int = 50, lr: float | None = None, optimizer: str = "sgd",
                  momentum: float = 0.9, nesterov: bool = True, grad_clip: float = 0.1,
                  regularization: float = 0.01, callback: Callable[[ReNOStep], object] | None = None,
                  seed: int | None = None) -> ReNOResult:
    """Optimise ``noise`` [B, ...] so ``generator(noise)`` lowers ``reward``'s per-item loss.

    reward: a ``RewardSum``, one ``RewardTerm`` or a list of terms. lr: None gives
    ``DEFAULT_LR[optimizer]``. grad_clip: per-item gradient norm bound (0 disables).
    regularization: weight of the chi-norm regulariser (0 disables). callback(step: ReNOStep) runs
    after every iteration; returning ``False`` stops early, raising propagates (interrupts).
    seed: if given, the torch RNG is seeded, inside a forked RNG state, before every iteration (as
    ReNO does), so a stochastic generator draws the same randomness each time (its best noise
    reproduces its best latents) and the caller's RNG is untouched. Works under an outer
    ``torch.inference_mode()``; the input noise is never modified; everything returned is detached.
    """
    _validate(generator, noise, iterations, optimizer, callback)
    reward = RewardSum(reward)
    lr = _number(DEFAULT_LR[optimizer] if lr is None else lr, "lr", 0.0, False)
    momentum = _number(momentum, "momentum", 0.0, True, 1.0)
    grad_clip = _number(grad_clip, "grad_clip", 0.0, True)
    regularization = _number(regularization, "regularization", 0.0, True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer or None, got {seed!r}")

    # fork every initialised CUDA device too: the generator may run on one the noise is not on
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        return _run(generator, noise, reward, iterations, lr, optimizer, momentum, nesterov,
                    grad_clip, regularization, callback, seed)


def _run(generator, noise, reward, iterations, lr, optimizer, momentum, nesterov, grad_clip,
         regularization, callback, seed=None) -> ReNOResult:
    initial_noise = noise.detach().clone()
    z = initial_noise.to(torch.float32).clone().requires_grad_(True)  # optimise in float32
    if optimizer == "sgd":
        opt = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    else:
        opt = torch.optim.Adam([z], lr=lr, eps=ADAM_EPS)
    batch = z.shape[0]
    history: dict[str, list[list[float]]] = {}
    best_latents = best_noise = initial_latents = None
    best_loss = torch.full((batch,), math.inf)
    best_iter = torch.zeros(batch, dtype=torch.long)
    initial_loss: list[float] = []
    stopped, run, started = False, 0, time.perf_counter()

    for it in range(iterations):
        if seed is not None:   # every iteration draws what the first did (ReNO reseeds per iteration): a
            torch.manual_seed(seed)   # stochastic generator's best pick is then reproduced by its noise
        with _inference_tensor_hint():
            x0 = generator(z)
        if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] != batch:
            got = list(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise InputError(f"generator must return raw latents with batch {batch}, got {got}")
        if not x0.requires_grad:
            raise InputError("generator output does not depend differentiably on the noise; "
                             "it must be built from torch operations on its input (no detach, no inference mode)")
        finite = _finite_items(x0, it)
        with _inference_tensor_hint():
            total, values = _evaluate_finite(reward, x0, finite)
        reg = chi_regularizer(z).to(total.device)
        objective = (total + regularization * reg).sum()

        loss_now = total.detach().float().cpu()
        norm_now = z.detach().flatten(1).float().norm(dim=1).cpu()
        x0d = x0.detach()
        if it == 0:
            initial_latents, initial_loss = x0d.clone(), loss_now.tolist()
            best_latents, best_noise = x0d.clone(), z.detach().clone()
        improved = loss_now < best_loss                      # NaN never improves
        if improved.any():
            m = improved.to(x0d.device).view(-1, *[1] * (x0d.ndim - 1))
            best_latents = torch.where(m, x0d, best_latents)
            best_noise = torch.where(m.to(z.device).view(-1, *[1] * (z.ndim - 1)), z.detach(), best_noise)
            best_loss = torch.where(improved, loss_now, best_loss)
            best_iter = torch.where(improved, torch.full_like(best_iter, it), best_iter)

        grad_norm = torch.zeros(batch)
        if it < iterations - 1:
            with _inference_tensor_hint():
                (grad,) = torch.autograd.grad(objective, [z])   # no .grad left on model weights
            grad, grad_norm = _clip_per_item(grad, grad_clip)
            z.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)

        record = {"total": loss_now, "regularizer": reg.detach().float().cpu(),
                  "noise_norm": norm_now,
                  "grad_norm": grad_norm.cpu(), **{k: v.float().cpu() for k, v in values.items()}}
        for k, v in record.items():
            history.setdefault(k, []).append([float(x) for x in v])
        run = it + 1
        if callback is not None:
            step = ReNOStep(it, iterations, x0d, loss_now.tolist(), best_latents, best_loss.tolist(),
                            best_iter.tolist())
            if callback(step) is False:
                stopped = it < iterations - 1
                break

    return ReNOResult(latents=best_latents, initial_latents=initial_latents, noise=best_noise.to(noise.dtype),
                      initial_noise=initial_noise, best_iteration=best_iter.tolist(),
                      best_loss=best_loss.tolist(), initial_loss=initial_loss, iterations_run=run,
                      stopped_early=stopped, seconds_per_iteration=(time.perf_counter() - started) / run,
                      history=history)
