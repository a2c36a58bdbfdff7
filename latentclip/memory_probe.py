"""Working memory of a backward pass, measured at small sizes and extrapolated to the real one.

ReNO backpropagates through the whole UNet. What that holds depends on the architecture (widths,
attention levels, which layers are checkpointed, the attention kernel), so a constant per parameter
fits one model and misses another (the tiny SDXL holds ~6x what the SD2.1 constant predicts). Instead
the run itself is measured: one forward+backward of the real generator at reduced latent sizes
(1/8, 1/4 and 1/2 of each side: together about a third of one real iteration), its peak allocation
above the start, fitted as ``k + a * pixels + c * pixels**2`` and evaluated at the real size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

#: Multiplies the measured peaks: allocator rounding, and what the fit misses between the probes and the real size.
SAFETY = 1.2


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated above the state at the call while ``fn`` runs on ``device``.

    CUDA: the allocator's own peak counter. Elsewhere: torch's profiler memory events, replayed in
    time order (op-level resolution; slower, for tests and CPU measurements)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def probe_sizes(height: int, width: int, multiple: int = 8) -> list[tuple[int, int]]:
    """Reduced latent sizes to measure at: about 1/8, 1/4 and 1/2 of each side, keeping the aspect
    ratio, in multiples of ``multiple`` (what every UNet and patchifier here takes); sizes that would
    repeat or reach the real size are dropped, and latents already that small are measured as they are."""
    side = lambda s, f: max(multiple, math.ceil(s * f / multiple) * multiple)  # noqa: E731
    sizes = []
    for f in (1 / 8, 1 / 4, 1 / 2):
        hw = (side(height, f), side(width, f))
        if hw[0] * hw[1] < height * width and hw not in sizes:
            sizes.append(hw)
    return sizes if len(sizes) >= 2 else [(height, width)]


def _linear(p1, b1, p2, b2, pixels) -> float:
    a = (b2 - b1) / (p2 - p1)
    k = b1 - a * p1
    if a < 0:
        return max(b1, b2)
    if k < 0:
        return b2 / p2 * pixels
    return k + a * pixels


def extrapolate(points: list[tuple[int, int]], pixels: int) -> int:
    """Bytes at ``pixels`` from measured ``(pixels, bytes)`` points. One point scales linearly; two fit
    ``k + a * p``; three fit ``k + a * p + c * p**2`` (``c``: attention kept in full for backward, as
    ComfyUI's sub-quadratic and split kernels keep it; ~0 with PyTorch's flash kernels). A fit with a
    negative coefficient falls back to the line through the two largest points, never below them."""
    if not points:
        raise ValueError("extrapolate needs at least one measured point")
    pts = sorted(points)
    if len(pts) == 1 or pts[0][0] == pts[-1][0]:
        return int(math.ceil(max(b for _, b in pts) * pixels / pts[-1][0]))
    if len(pts) >= 3:
        (p1, b1), (p2, b2), (p3, b3) = pts[-3:]
        d1, d2 = (b2 - b1) / (p2 - p1), (b3 - b2) / (p3 - p2)
        c = (d2 - d1) / (p3 - p1)
        a = d1 - c * (p1 + p2)
        k = b1 - a * p1 - c * p1 * p1
        if min(a, c, k) >= 0:
            return int(math.ceil(k + a * pixels + c * pixels * pixels))
    (p1, b1), (p2, b2) = pts[-2:]
    return int(math.ceil(_linear(p1, b1, p2, b2, pixels)))


def probe_backward_memory(generator: Callable[[torch.Tensor], torch.Tensor], shape, device, dtype) -> dict:
    """Peak working memory of ``generator``'s forward and backward with respect to its input, for
    noise of ``shape`` ([..., height, width]), measured at ``probe_sizes`` and extrapolated (not
    including ``SAFETY``: ``request_bytes`` adds it).

    The backward stands in for ReNO's: the gradient reaches only the noise. Returns the estimate in
    bytes and the measured points, for logs and tests."""
    *lead, height, width = shape
    sizes = probe_sizes(height, width)
    points = []
    for i, (h, w) in enumerate([sizes[0], *sizes]):   # the first is a warm-up: one-time buffers and caches
        with torch.inference_mode(False), torch.enable_grad():
            z = torch.randn(*lead, h, w, device=device, dtype=dtype, requires_grad=True)

            def step():   # ReNO's own call: autograd.grad to the noise (it holds more than .backward()
                # with checkpointing: 35.6 vs 28.7 MiB on the tiny SDXL at 64x64)
                torch.autograd.grad(generator(z).float().square().mean(), [z])
            if i == 0:
                step()
            else:
                points.append((h * w, peak_bytes(step, device)))
            del z
    return {"bytes": extrapolate(points, height * width), "points": points, "pixels": height * width}


def reward_backward_memory(reward_loss: Callable[[torch.Tensor], torch.Tensor], shape, device, dtype) -> int:
    """Peak bytes of one reward evaluation and its backward on latents of the real ``shape``. In ReNO
    it runs while the generator's activations are still held, so the two add."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
        return peak_bytes(lambda: torch.autograd.grad(reward_loss(x).float().sum(), [x]), device)


def request_bytes(generator_bytes: int, reward_bytes: int) -> int:
    """What ReNO asks model management for: both measured peaks, with ``SAFETY``."""
    return int(math.ceil(SAFETY * (generator_bytes + reward_bytes)))
