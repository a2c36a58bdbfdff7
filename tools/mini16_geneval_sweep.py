"""GenEval-mini of ReNO and FK runs on the mini16 generator with given settings, on TUNING seeds by default.

    python tools/mini16_geneval_sweep.py --runs '{"lat10_lr32": ["reno_latent", {"iterations": 10, "lr": 32}]}' \
        [--seeds 100-111] [--weights weights/mini16] [--latent STUDENT.safetensors]
    python tools/mini16_geneval_sweep.py --runs '{"fk": ["fk_latent", {}], "fk_pix": ["fk_pixel", {}]}'
    python tools/mini16_geneval_sweep.py --verifiers [--latent FILE] [--seeds 100-103]

How ``mini16.HALF_SETTINGS`` and ``PIXEL_TUNED_SETTINGS`` were chosen: each reward's learning rate, at its
iteration count, is the best of a sweep on GenEval-mini's prompts with seeds 100-111 (``--seeds``'s default),
never the evaluation's seeds 0-3 (``geneval.SEEDS``), on which the chosen settings are then reported once by
``eval --family mini16``. ReNO runs (``geneval.RUNS``) take ReNO settings (iterations, lr, ...); FK runs
(``fk_latent``, ``fk_pixel``) take overrides of search-mini's ``FK`` settings (temperature, start, ...).
``--latent`` scores with another distilled student than the folder's (a recipe search's ``--save``).
``--verifiers``: how well each reward picks FK's particles at each step (``search.informative_steps`` for the
distilled and the pixel reward on the same particles: the judge's success of the particle each one ranks
first after step s, with the mean over particles as ``random``), printed as one JSON line.
Prints one JSON line per run: its settings, GenEval-mini ``overall`` (%) and the process CPU seconds it
took (one torch thread).
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


def run_one(world, pairs, run: str, settings: dict, seeds) -> dict:
    from latentclip.miniworld import geneval as G
    from latentclip.miniworld import mini16
    from latentclip.miniworld import search as MS
    quiet = lambda *a: None   # noqa: E731
    if run in mini16.FK_RUNS:
        return MS.evaluate(world, pairs, seeds=seeds, runs=(run,), fk=settings, log=quiet)[run]
    return G.evaluate(world, pairs, seeds=seeds, runs=(run,), settings=settings, log=quiet)[run]


def main(argv=None) -> int:
    from dataclasses import replace

    from latentclip.miniworld import geneval as G
    from latentclip.miniworld import mini16
    kinds = G.RUNS + mini16.FK_RUNS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", help=f'JSON {{name: [run, {{settings}}]}}, run one of {", ".join(kinds)}')
    ap.add_argument("--seeds", type=seed_range, default=seed_range("100-111"))
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mini16"))
    ap.add_argument("--latent", default=None, help="a mini16 Latent-CLIP file to use as the distilled reward")
    ap.add_argument("--verifiers", action="store_true", help="per-step particle picks of both rewards instead of runs")
    args = ap.parse_args(argv)
    if (args.runs is None) == (not args.verifiers):
        ap.error("give --runs or --verifiers (one of them)")
    try:
        runs = json.loads(args.runs or "{}")
        assert isinstance(runs, dict) and all(r in kinds and isinstance(s, dict) for r, s in runs.values())
    except (ValueError, TypeError, AssertionError):
        ap.error(f'--runs must be JSON {{name: [run, {{settings}}]}} with run one of {", ".join(kinds)}')
    torch.set_num_threads(1)
    world, pairs = mini16.load_world(args.weights), G.default_prompts()
    if args.latent:
        from latentclip import checkpoints
        world = replace(world, latent_clip=checkpoints.load(args.latent))
    if args.verifiers:
        from latentclip.miniworld import search as MS
        picks = {kind: MS.informative_steps(world, pairs, args.seeds, kind=kind) for kind in ("latent", "pixel")}
        print(json.dumps({"seeds": f"{args.seeds[0]}-{args.seeds[-1]}", "latent": args.latent and Path(args.latent).name,
                          "random": round(100 * picks["latent"]["random"], 2),
                          **{kind: {s: round(100 * v, 2) for s, v in r["pick_success"].items()} for kind, r in picks.items()}}))
    for name, (run, settings) in runs.items():
        t = time.process_time()
        r = run_one(world, pairs, run, settings, args.seeds)
        print(json.dumps({"name": name, "run": run, "settings": settings, "seeds": f"{args.seeds[0]}-{args.seeds[-1]}",
                          "latent": args.latent and Path(args.latent).name,
                          "overall": round(100 * r["overall"], 2), "cpu_seconds": round(time.process_time() - t, 1)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
