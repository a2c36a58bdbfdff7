"""GenEval-mini of ReNO runs on the mini16 generator with given settings, on TUNING seeds by default.

    python tools/mini16_reno_sweep.py --runs '{"lat10_lr32": ["reno_latent", {"iterations": 10, "lr": 32}]}' \
        [--seeds 100-111] [--weights weights/mini16]

How ``mini16.HALF_SETTINGS`` and ``PIXEL_TUNED_SETTINGS`` were chosen: each reward's learning rate, at its
iteration count, is the best of a sweep on GenEval-mini's prompts with seeds 100-111 (``--seeds``'s default),
never the evaluation's seeds 0-3 (``geneval.SEEDS``), on which the chosen settings are then reported once by
``eval --family mini16``. Prints one JSON line per run: its settings, GenEval-mini ``overall`` (%) and the
process CPU seconds it took (one torch thread).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seed_range(text: str) -> tuple[int, ...]:
    first, _, last = text.partition("-")
    try:
        seeds = tuple(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be N or N-M, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} holds no seed")
    return seeds


def main(argv=None) -> int:
    from latentclip.miniworld import geneval as G
    from latentclip.miniworld import mini16
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help='JSON {name: ["reno_latent" or "reno_pixel", {settings}]}')
    ap.add_argument("--seeds", type=seed_range, default=seed_range("100-111"))
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mini16"))
    args = ap.parse_args(argv)
    try:
        runs = json.loads(args.runs)
        assert isinstance(runs, dict) and all(r in G.RUNS and isinstance(s, dict) for r, s in runs.values())
    except (ValueError, TypeError, AssertionError):
        ap.error('--runs must be JSON {name: ["reno_latent" or "reno_pixel", {settings}]}')
    torch.set_num_threads(1)
    world, pairs = mini16.load_world(args.weights), G.default_prompts()
    for name, (run, settings) in runs.items():
        t = time.process_time()
        r = G.evaluate(world, pairs, seeds=args.seeds, runs=(run,), settings=settings, log=lambda *a: None)[run]
        print(json.dumps({"name": name, "run": run, "settings": settings, "seeds": f"{args.seeds[0]}-{args.seeds[-1]}",
                          "overall": round(100 * r["overall"], 2), "cpu_seconds": round(time.process_time() - t, 1)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
