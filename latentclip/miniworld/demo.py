"""``python -m latentclip demo``: the whole idea offline, on the embedded mini-world weights.

Six prompts x SEEDS_PER_PROMPT seeds: the mini generator's baseline, ReNO with the Latent-CLIP reward
(no decoding) and ReNO with the pixel-CLIP reward (decode + pixel CLIP every iteration), same noise,
iterations and lr. The judge (pixel space, no CLIP) checks every image, and the summary compares the
judge's rates with 95% intervals and a paired sign test on the same noises, so the comparison rests on
many images rather than on one per prompt. The pictures show the same: a chart of how many of the seeds
each method got right per prompt, a grid of the images where the methods' verdicts differ (each labelled
with the judge's verdict), the reward curves of each reward model on its own axes, a safety example (an
unwanted shape suppressed by the latent guidance step and by ReNO with an avoid reward) and timings. About a
minute on 2 CPU cores; needs only the committed ``weights/mini``.
"""
from __future__ import annotations

import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import geneval as G
from . import judge as J
from . import safety_mini as SM
from .generator import noise_for

PROMPTS = ("a red circle", "three blue squares", "a green triangle to the left of a yellow circle",
           "a blue square above a red triangle", "two yellow circles", "a red square below a green circle")
SEED = 7
SEEDS_PER_PROMPT = 8   # 48 images per run: rates to about +-14 points (95%) instead of one image per prompt
SAFETY_SEEDS = tuple(range(200, 208))
COLUMNS = (("baseline", "baseline"), ("reno_latent", "ReNO Latent-CLIP"), ("reno_pixel", "ReNO pixel CLIP"))
REWARD_NAMES = {"latent": "ReNO, Latent-CLIP reward", "pixel": "ReNO, pixel-CLIP reward"}
CELL = 128
GRID_ROWS = 6          # images shown in grid.png, chosen among those where the methods' verdicts differ


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, width: int = 30, stream=None):
        self.total, self.done, self.width, self.stream = total, 0, width, stream or sys.stderr
        self.t0, self.label = time.perf_counter(), ""

    def update(self, n: int = 1, label: str | None = None):
        self.done = min(self.total, self.done + n)
        self.label = label if label is not None else self.label
        fill = int(self.width * self.done / self.total)
        self.stream.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {100 * self.done / self.total:5.1f}% "
                          f"{time.perf_counter() - self.t0:5.0f}s  {self.label:<32}")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


def _tile(img: torch.Tensor, ok: bool | None, words=("judge: ok", "judge: no")) -> Image.Image:
    arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    tile = Image.fromarray(arr).resize((CELL, CELL), Image.NEAREST)
    if ok is not None:
        d = ImageDraw.Draw(tile)
        color = (20, 150, 40) if ok else (200, 30, 30)
        d.rectangle([0, 0, CELL - 1, CELL - 1], outline=color, width=3)
        d.text((5, CELL - 14), words[0] if ok else words[1], fill=color)
    return tile


def grid(rows: list[tuple[str, list]], headers: list[str], words=("judge: ok", "judge: no")) -> Image.Image:
    """rows: (label, [(image tensor, ok)]) -> one PNG-ready image with a header row; ``words``
    label a green (ok) and a red frame."""
    label_w, head_h, pad = 210, 22, 6
    cols = max(len(r[1]) for r in rows)
    out = Image.new("RGB", (label_w + cols * (CELL + pad), head_h + len(rows) * (CELL + pad)), "white")
    d = ImageDraw.Draw(out)
    for j, h in enumerate(headers):
        d.text((label_w + j * (CELL + pad) + 4, 5), h, fill="black")
    for i, (label, cells) in enumerate(rows):
        y = head_h + i * (CELL + pad)
        tokens, line, lines = label.split(), "", []
        for w in tokens:  # wrap the prompt into the label column
            if len(line) + len(w) > 30:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            d.text((6, y + CELL // 2 - 7 * len(lines) + 14 * k), text, fill="black")
        for j, (img, ok) in enumerate(cells):
            out.paste(_tile(img, ok, words), (label_w + j * (CELL + pad), y))
    return out


def run_demo(out, weights=None, prompts=None, iterations: int | None = None, safety_seeds=None,
             quiet: bool = False) -> dict:
    """Write grid.png, reward_curves.png, safety.png and summary.md into ``out``; returns the numbers.

    prompts, safety_seeds, iterations default to PROMPTS, SAFETY_SEEDS and GenEval-mini's ReNO
    iterations (read at call time).
    """
    from ..configs import WEIGHTS_DIR
    from ..plotting import count_chart, plot_curves, side_by_side
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    world = G.load_world(Path(weights) if weights else WEIGHTS_DIR / "mini")
    settings = {} if iterations is None else {"iterations": iterations}
    iters = settings.get("iterations", G.RENO["iterations"])
    prompts = list(prompts or PROMPTS)
    safety_seeds = tuple(safety_seeds or SAFETY_SEEDS)
    bar = Progress(2 * iters + 3 + 1, stream=io.StringIO() if quiet else None)
    n_seeds = SEEDS_PER_PROMPT
    # item (prompt i, seed k) at index k * len(prompts) + i; seed k = 0 is the prompt's grid image
    items = [(p, SEED + i + len(prompts) * k) for k in range(n_seeds) for i, p in enumerate(prompts)]
    all_prompts = [p for p, _ in items]
    noise = noise_for([seed for _, seed in items])

    results, timings, curves = {}, {}, {}
    t = time.perf_counter()
    results["baseline"] = G.baseline_latents(world, all_prompts, noise)
    timings["baseline"] = time.perf_counter() - t
    bar.update(1, "baseline")
    for kind in ("latent", "pixel"):
        name = f"reno_{kind}"
        t = time.perf_counter()
        res = G.reno_latents(world, kind, all_prompts, noise, settings,
                             callback=lambda s, n=name: bar.update(1, f"{n} {s.iteration + 1}/{s.iterations}"))
        timings[name] = time.perf_counter() - t
        results[name] = res.latents
        curves[REWARD_NAMES[kind]] = [float(np.mean(v)) for v in res.history["total"]]

    images = {k: G.decode(world, v) for k, v in results.items()}
    verdicts = {k: [bool(J.check(img, p)["ok"]) for img, p in zip(images[k], all_prompts)] for k in images}
    per_prompt = {k: [sum(v[k_ * len(prompts) + i] for k_ in range(n_seeds)) for i in range(len(prompts))]
                  for k, v in verdicts.items()}
    count_chart(prompts, {label: per_prompt[k] for k, label in COLUMNS}, n_seeds,
                f"Judge ok out of {n_seeds} seeds per prompt (same noises for every method)").save(out / "per_prompt.png")
    shown = differing_items(verdicts, len(prompts), n_seeds, GRID_ROWS)
    rows = [(f"{items[j][0]} (seed {items[j][1]})", [(images[k][j], verdicts[k][j]) for k, _ in COLUMNS]) for j in shown]
    grid(rows, [h for _, h in COLUMNS]).save(out / "grid.png")
    side_by_side([plot_curves({"mean over the images": ys}, f"{name}: loss per iteration",
                              size=(440, 300), ylabel="lower is better") for name, ys in curves.items()]
                 ).save(out / "reward_curves.png")

    # safety: prompts that name only a colour; the unwanted concept is a shape (SM.CONCEPT)
    safety, s_images = {}, {}
    for run in SM.RUNS:
        r = SM.run_one(world, run, SM.PROMPTS, safety_seeds)
        safety[run] = {"concept_rate": float(np.mean(r["concept"])), "prompt_success": float(np.mean(r["ok"])),
                       "seconds": r["seconds"]}
        s_images[run] = (r["images"], r["concept"], r["prompts"])
        bar.update(1, f"safety {run}")
    # show the items where the baseline drew the concept (or the first few if none)
    base_concept = s_images["baseline"][1]
    show = [i for i, c in enumerate(base_concept) if c][:6] or list(range(4))
    s_rows = [(f"{s_images['baseline'][2][i]} (seed {safety_seeds[i % len(safety_seeds)]})",
               [(s_images[run][0][i], not s_images[run][1][i]) for run in SM.RUNS]) for i in show]
    grid(s_rows, ["baseline", "latent guidance", "ReNO avoid"],
         (f"no {SM.CONCEPT}", f"{SM.CONCEPT} found")).save(out / "safety.png")

    total = time.perf_counter() - t_start
    summary = {"prompts": prompts, "seeds_per_prompt": n_seeds, "verdicts": verdicts, "per_prompt": per_prompt,
               "grid_items": [items[j] for j in shown],
               "seconds": timings, "iterations": iters, "safety": safety, "safety_images": len(SM.PROMPTS) * len(safety_seeds),
               "total_seconds": total}
    (out / "summary.md").write_text(_markdown(summary))
    bar.update(1, "done")
    bar.close()
    return summary


def differing_items(verdicts: dict[str, list[bool]], n_prompts: int, n_seeds: int, limit: int) -> list[int]:
    """Indices (seed k of prompt i at ``k * n_prompts + i``) of up to ``limit`` images whose verdicts differ between
    the methods, taking prompts in turn so several prompts are shown; the first seeds of the first prompts when
    all methods agree everywhere."""
    runs = list(verdicts.values())
    differ = [[k * n_prompts + i for k in range(n_seeds) if len({r[k * n_prompts + i] for r in runs}) > 1]
              for i in range(n_prompts)]
    chosen = [j for rank in range(n_seeds) for per in differ if rank < len(per) for j in [per[rank]]][:limit]
    return chosen or list(range(min(limit, n_prompts)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Paired comparison on the same noises: (a ok & b not, b ok & a not, exact two-sided p-value)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return only_a, only_b, min(1.0, 2 * tail)


def _markdown(s: dict) -> str:
    n_prompts, n_seeds = len(s["prompts"]), s["seeds_per_prompt"]
    n = n_prompts * n_seeds
    lines = ["# Latent-CLIP mini-world demo", "",
             f"ReNO ({s['iterations']} iterations, same noise, lr and optimiser for both rewards) on the mini "
             f"generator (8x8x4 latents of the mini VAE), {n_prompts} prompts x {n_seeds} seeds = {n} images per run. "
             "The judge (pixel-space, no CLIP) checks every image.", "",
             "| run | judge ok | rate (95% interval) | seconds (all images) | seconds / image |", "|---|---|---|---|---|"]
    for k, label in COLUMNS:
        ok = sum(s["verdicts"][k])
        lo, hi = wilson(ok, n)
        lines.append(f"| {label} | {ok}/{n} | {100 * ok / n:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
                     f"{s['seconds'][k]:.1f} | {s['seconds'][k] / n:.3f} |")
    lines += ["", f"Paired on the same {n} noises (images where only one run is judged ok; exact sign test):", ""]
    for a, b in (("reno_latent", "baseline"), ("reno_pixel", "baseline"), ("reno_latent", "reno_pixel")):
        only_a, only_b, p = sign_test(s["verdicts"][a], s["verdicts"][b])
        la, lb = dict(COLUMNS)[a], dict(COLUMNS)[b]
        verdict = "a difference beyond chance" if p < 0.05 else "within chance at this sample size"
        lines.append(f"- {la} vs {lb}: {only_a} vs {only_b} (p = {p:.3g}; {verdict})")
    lines += ["", f"Per prompt (judge ok out of {n_seeds} seeds):", "",
              "| prompt | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * 4 + "|"]
    for i, p in enumerate(s["prompts"]):
        lines.append(f"| {p} | " + " | ".join(f"{s['per_prompt'][k][i]}/{n_seeds}" for k, _ in COLUMNS) + " |")
    n_safe = s["safety_images"]
    lines += ["", f"## Safety: unwanted concept '{SM.CONCEPT}' (prompts {', '.join(SM.PROMPTS)}; {n_safe} images per run)", "",
              "| run | concept rate (95% interval) | prompt success | seconds |", "|---|---|---|---|"]
    for k, v in s["safety"].items():
        lo, hi = wilson(round(v["concept_rate"] * n_safe), n_safe)
        lines.append(f"| {k} | {100 * v['concept_rate']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
                     f"{100 * v['prompt_success']:.0f}% | {v['seconds']:.1f} |")
    lines += ["", "Files: `per_prompt.png` (the per-prompt table above as a chart), `grid.png` (images where the "
              "methods' verdicts differ: baseline | ReNO Latent-CLIP | ReNO pixel CLIP, each with the judge's verdict), "
              "`reward_curves.png` (each reward model's loss on its own axes), "
              f"`safety.png` (baseline | latent guidance | ReNO avoid; green frame = no {SM.CONCEPT}).",
              "", f"Total wall time: {s['total_seconds']:.1f} s ({torch.get_num_threads()} torch threads).", "",
              "The grid illustrates; the rates above measure, on these six prompts only. GenEval-mini (67 prompts x 4 "
              "seeds) and safety-mini: `python -m latentclip.miniworld eval`, results in docs/miniworld_part2.md.", ""]
    return "\n".join(lines)


def main(out: str = "demo_out", force: bool = False) -> int:
    """Entry point of ``python -m latentclip demo --out DIR [--force]``: a folder that holds files is
    refused unless ``force`` (the demo writes summary.md and pictures under fixed names)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():   # --force replaces the demo's files in a folder, never a file
        raise FileExistsError(f"--out '{folder}' is a file, not a folder; give a new or empty folder")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise FileExistsError(f"--out '{folder}' exists and is not an empty folder; give a new folder, or --force "
                              "to replace the demo's files in it")
    # one thread: the batches are tiny, and on a busy 2-core machine a second OpenMP thread stalls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = Path(out)
    print(f"Latent-CLIP demo: mini-world ReNO and safety on the embedded weights -> {out}")
    try:
        s = run_demo(out)
    finally:
        torch.set_num_threads(threads)
    n = len(s["verdicts"]["baseline"])
    print(f"judge ok: baseline {sum(s['verdicts']['baseline'])}/{n}, ReNO Latent-CLIP "
          f"{sum(s['verdicts']['reno_latent'])}/{n}, ReNO pixel CLIP {sum(s['verdicts']['reno_pixel'])}/{n}; "
          f"ReNO seconds: latent {s['seconds']['reno_latent']:.1f}, pixel {s['seconds']['reno_pixel']:.1f}")
    for name in ("per_prompt.png", "grid.png", "reward_curves.png", "safety.png", "summary.md"):
        print(f"  {(out / name).resolve()}")
    print(f"done in {s['total_seconds']:.0f} s")
    return 0
