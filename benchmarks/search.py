"""Cost of one scoring point of an inference-time search: N particles' x0 predictions scored by a
Latent-CLIP (no decode) or by VAE decode + pixel CLIP (what pixel verifiers do at every step).

    python -m benchmarks.run --only search [--search-particles 8] [--search-resolution 1024]

Forward only (a search scores, it does not backpropagate). The Latent-CLIP scores the whole
particle batch at once; the pixel path decodes ``decode_batch`` particles at a time (1 by default,
as decoding 1024 px latents in one batch needs several GB per image) and scores every image.
"""
from __future__ import annotations

import statistics
import time

import torch

from .cases import PeakMemory, _finite, _sync, make_reward, n_repeats, time_repeats


def search_scoring(spec, device, dtype):
    """Median seconds of one scoring point for ``spec["particles"]`` particles at ``spec["resolution"]``."""
    n, side = int(spec["particles"]), spec["resolution"] // 8
    z = torch.randn(n, 4, side, side, device=device, dtype=dtype)
    out = {}
    for path, model in (("latent", spec["latent_model"]), ("pixel", spec.get("pixel_model"))):
        if not model:
            continue
        reward = make_reward(path, model, device, dtype)
        per = n if path == "latent" else max(1, int(spec.get("decode_batch", 1)))

        def score():
            with torch.no_grad():
                return torch.stack([reward(z[i:i + per]) for i in range(0, n, per)])

        mem = PeakMemory(device)
        mem.start()
        t0 = time.perf_counter()
        _finite(score(), f"{path} scores")
        _sync(device)
        first = time.perf_counter() - t0
        times, cpu = time_repeats(score, device, spec["warmup"] - 1, n_repeats(spec, first))
        peak, _ = mem.stop()
        out.update({f"{path}_s": statistics.median(times), f"{path}_cpu_s": statistics.median(cpu),
                    f"{path}_times_s": times, f"{path}_peak_mb": peak, f"{path}_source": reward.source})
    if "latent_s" in out and "pixel_s" in out:
        out["pixel_over_latent"] = out["pixel_s"] / out["latent_s"]
    return out


def summary_line(out: dict) -> str:
    parts = [f"{k}: {out[f'{k}_s']:.3f}s ({out[f'{k}_s'] / out['particles']:.3f}s per particle)"
             for k in ("latent", "pixel") if f"{k}_s" in out]
    ratio = f", pixel/latent {out['pixel_over_latent']:.1f}x" if "pixel_over_latent" in out else ""
    return "; ".join(parts) + ratio
