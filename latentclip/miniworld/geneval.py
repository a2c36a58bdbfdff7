"""GenEval-mini: does ReNO with a Latent-CLIP reward lift compositional accuracy like a pixel CLIP?

A fixed prompt set of the grammar in six GenEval-style categories, several seeds per prompt, each
image judged on its decoded pixels by the CLIP-free judge. Three runs share the prompts, seeds and
generator: the baseline (the generator's own samples), ReNO with the Latent-CLIP match reward
(``LatentMatch`` on raw latents) and ReNO with the pixel-CLIP reward (``PixelCLIPMatch``: decode
with the mini VAE + pixel CLIP every iteration), with the same iterations, lr and optimiser. All
runs use the project's one ReNO loop (``latentclip.reno.reno_optimize``).

Categories (what the judge must confirm):

* ``single_object`` ("a circle", "a red object"): one object with the named shape or colour;
* ``colors`` ("a red circle"): one object, the named colour and shape;
* ``counting`` ("three blue squares"): exactly that many, all of the named colour and shape;
* ``two_objects`` (a relation prompt): exactly two objects whose shapes are the named ones;
* ``color_binding`` (a relation prompt): exactly two objects, each colour on the right shape;
* ``position`` (a relation prompt): all of the above and the relation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import judge as J
from . import scenes as S
from ..errors import InputError
from ..reno import reno_optimize
from ..rewards import LatentMatch, PixelCLIPMatch

CATEGORIES = ("single_object", "colors", "counting", "two_objects", "color_binding", "position")
RUNS = ("baseline", "reno_latent", "reno_pixel")
#: ReNO settings shared by both rewards (tuned once on other seeds; see docs/miniworld_part2.md).
RENO = {"iterations": 20, "lr": 2.0, "optimizer": "sgd", "momentum": 0.9, "grad_clip": 0.1, "regularization": 0.01}
SEEDS = (0, 1, 2, 3)
PROMPT_FILE = Path(__file__).resolve().parents[2] / "prompts" / "geneval_mini.txt"


@dataclass
class World:
    """The shipped mini-world models, loaded for gradients (rewards backpropagate through them)."""
    vae: object
    generator: object
    latent_clip: object
    pixel_clip: object


def check_family_folder(weights, family: str, flag: str = "--weights") -> Path:
    """``weights`` if it holds the mini-world family ``family`` (mini: mini-*.safetensors; mini16: mini16-*),
    else one InputError saying which family it holds and what to pass."""
    w = Path(weights)
    if not w.is_dir():
        raise InputError(f"{flag} '{w}' is not a folder; expected a mini-world weights folder such as weights/{family}")
    holds = {f: (w / f"{f}-vae.safetensors").is_file() for f in ("mini", "mini16")}
    if not holds[family]:
        other = next((f for f, there in holds.items() if there), None)
        hint = f"it holds the {other} family: pass --family {other}" if other else "it holds no mini-world VAE"
        raise InputError(f"{flag} '{w}' is not a {family} weights folder ({hint}); expected {family}-vae.safetensors")
    return w


def load_world(weights) -> World:
    from .clips import load_latent_clip, load_pixel_clip
    from .generator import FILE, load_generator
    from .vae import load_vae
    w = check_family_folder(weights, "mini")
    return World(load_vae(w / "mini-vae.safetensors"), load_generator(w / FILE),
                 load_latent_clip(w / "mini-latent-clip.safetensors"), load_pixel_clip(w / "mini-pixel-clip.safetensors"))


# -- prompts -------------------------------------------------------------------------------------
def infer_category(prompt: str) -> str:
    spec = S.parse(prompt)
    if spec.kind == "count":
        return "counting"
    if spec.kind == "relation":
        return "position"
    return "colors" if spec.color and spec.shape else "single_object"


def read_prompts(path) -> list[tuple[str, str]]:
    """(category, prompt) per line of ``category: prompt`` or a bare prompt (category inferred)."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e).split(":")[0]
        raise InputError(f"prompt file {path} cannot be read ({reason}); expected a UTF-8 text file, one prompt a line") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cat, _, prompt = line.rpartition(":")
        cat, prompt = cat.strip(), prompt.strip()
        try:
            S.parse(prompt)
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}") from None
        if cat and cat not in CATEGORIES:
            raise InputError(f"{path}:{n}: category {cat!r} is not one of {CATEGORIES}")
        if cat in ("two_objects", "color_binding", "position") and S.parse(prompt).kind != "relation":
            raise InputError(f"{path}:{n}: category {cat!r} needs a two-object prompt, got {prompt!r}")
        out.append((cat or infer_category(prompt), prompt))
    if not out:
        raise InputError(f"prompt file {path} holds no prompts")
    return out


def prompt_only(path) -> list[str]:
    """The bare prompts of a GenEval-mini file (for tools that take one grammar prompt a line)."""
    return [p for _, p in read_prompts(path)]


def default_prompts() -> list[tuple[str, str]]:
    return read_prompts(PROMPT_FILE)


def success(category: str, verdict: dict) -> bool:
    """What a category asks of the judge's verdict (see the module docstring)."""
    if category == "two_objects":
        return verdict["shape"] and verdict["count"]
    if category == "color_binding":
        return verdict["object"] and verdict["count"]
    return verdict["ok"]


# -- generation ----------------------------------------------------------------------------------
def baseline_latents(world: World, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return world.generator.sample(noise, prompts)


def make_reward(world: World, kind: str, prompts: list[str]):
    """The match reward of one run: ``"latent"`` (Latent-CLIP) or ``"pixel"`` (decode + pixel CLIP)."""
    if kind == "latent":
        return LatentMatch(world.latent_clip, prompts)
    if kind == "pixel":
        return PixelCLIPMatch(world.pixel_clip.clip, world.vae.decode, prompts, tokenizer=world.pixel_clip.tokenizer,
                              image_range="0,1", image_size=64)
    raise InputError(f"reward kind must be 'latent' or 'pixel', got {kind!r}")


def reno_latents(world: World, kind: str, prompts: list[str], noise: torch.Tensor, settings: dict | None = None,
                 callback=None, extra_terms=()):
    """ReNO on the mini generator for one batch; returns the ReNOResult."""
    s = {**RENO, **(settings or {})}
    reward = [make_reward(world, kind, prompts), *extra_terms]
    gen = world.generator.as_function(prompts)
    return reno_optimize(gen, noise, reward, iterations=s["iterations"], lr=s["lr"], optimizer=s["optimizer"],
                         momentum=s["momentum"], grad_clip=s["grad_clip"], regularization=s["regularization"],
                         callback=callback, seed=0)


def decode(world: World, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return world.vae.decode(latents)


def _chunk(world: World, run: str, chunk, settings=None):
    """Latents of one run for one batch of (category, prompt, seed) items, its wall time, its loss curve."""
    from .generator import noise_for
    prompts = [p for _, p, _ in chunk]
    noise = noise_for([sd for _, _, sd in chunk], channels=world.generator.latent_channels)
    t0 = time.perf_counter()
    if run == "baseline":
        return baseline_latents(world, prompts, noise), time.perf_counter() - t0, None
    res = reno_latents(world, run.split("_", 1)[1], prompts, noise, settings)
    return res.latents, time.perf_counter() - t0, res.history["total"]


def run_many(world: World, runs, items: list[tuple[str, str, int]], batch: int = 96, settings=None,
             progress=None) -> dict:
    """Several runs over the same items: per run per-item success, images, timing, mean loss curve.

    Runs are interleaved batch by batch, so on a shared machine every run sees the same load and
    the seconds per image compare fairly.
    """
    parts = {r: {"lat": [], "hist": [], "seconds": 0.0} for r in runs}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        for run in runs:
            lat, sec, hist = _chunk(world, run, chunk, settings)
            parts[run]["lat"].append(lat)
            parts[run]["seconds"] += sec
            if hist is not None:
                parts[run]["hist"].append(hist)
            if progress:
                progress(run, len(chunk))
    out = {}
    for run, p in parts.items():
        latents = torch.cat(p["lat"])
        images = decode(world, latents)
        verdicts = [J.check(img, pr) for img, (_, pr, _) in zip(images, items)]
        ok = [success(c, v) for v, (c, _, _) in zip(verdicts, items)]
        curve = np.concatenate([np.array(h) for h in p["hist"]], axis=1).mean(1).tolist() if p["hist"] else []
        out[run] = {"ok": ok, "verdicts": verdicts, "latents": latents, "images": images,
                    "seconds": p["seconds"], "mean_loss_curve": curve}
    return out


def run_one(world: World, run: str, items, batch: int = 96, settings=None) -> dict:
    return run_many(world, [run], items, batch, settings)[run]


def summarize(items, ok: list[bool], seconds: float) -> dict:
    """``overall`` (mean of the category scores, as GenEval reports), per category, per image, timing."""
    cats = [c for c in CATEGORIES if any(ci == c for ci, _, _ in items)]
    per = {c: float(np.mean([o for o, (ci, _, _) in zip(ok, items) if ci == c])) for c in cats}
    return {"overall": float(np.mean(list(per.values()))), **per, "images_correct": float(np.mean(ok)),
            "n_images": len(items), "seconds_per_image": seconds / max(1, len(items))}


def evaluate(world: World, prompts: list[tuple[str, str]] | None = None, seeds=SEEDS, runs=RUNS,
             settings: dict | None = None, batch: int = 96, log=print) -> dict:
    """GenEval-mini for the given runs: ``{run: summary}`` plus ``settings``."""
    prompts = prompts or default_prompts()
    items = [(c, p, int(s)) for c, p in prompts for s in seeds]
    t = time.perf_counter()
    res = run_many(world, list(runs), items, batch, settings)
    out = {}
    for run in runs:
        r = res[run]
        out[run] = summarize(items, r["ok"], r["seconds"])
        if r["mean_loss_curve"]:
            out[run]["mean_reward_loss"] = [round(v, 5) for v in r["mean_loss_curve"]]
        log(f"geneval {run}: overall {100 * out[run]['overall']:.1f}% ({out[run]['seconds_per_image']:.3f} s/image)")
    log(f"geneval: {time.perf_counter() - t:.0f} s for {len(runs)} runs of {len(items)} images")
    out["settings"] = {"reno": {**RENO, **(settings or {})}, "seeds": list(seeds), "prompts": len(prompts),
                       "threads": torch.get_num_threads(), "generator_steps": _steps(world)}
    return out


def _steps(world):
    from .generator import CFG, STEPS
    return {"euler_steps": STEPS, "cfg": CFG}


def format_table(r: dict) -> str:
    runs = [k for k in RUNS if k in r]
    lines = ["GenEval-mini success (%)", f"{'category':<16}" + "".join(f"{k:>13}" for k in runs)]
    for c in (*CATEGORIES, "overall"):
        if c in r[runs[0]]:
            lines.append(f"{c:<16}" + "".join(f"{100 * r[k][c]:>13.1f}" for k in runs))
    lines.append(f"{'s/image':<16}" + "".join(f"{r[k]['seconds_per_image']:>13.3f}" for k in runs))
    return "\n".join(lines)
