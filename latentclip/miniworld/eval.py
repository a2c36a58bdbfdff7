"""Evaluating the mini-world weights on held-out scenes: zero-shot of both CLIPs, judge, VAE.

Zero-shot tasks (each image scored against one caption per class, the other attributes true):
shape (3-way, single objects), colour (4-way, single objects), count (3-way, one to three like
objects), relation (4-way, two objects) and retrieval (each image against all candidate captions;
right when the best caption is true of the image, so "a red object" for a red circle counts).
The Latent-CLIP reads the mini VAE's raw latents of the very images the pixel CLIP reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import judge as J
from . import scenes as S
from .clips import load_latent_clip, load_pixel_clip
from .vae import images_to_tensor, load_vae

TASKS = ("shape", "color", "count", "relation", "retrieval")
#: Held-out seeds: the training stream uses other seeds (``train.make_pool``/``make_batch``).
EVAL_SEED = 9_000_001
FILES = {"vae": "mini-vae.safetensors", "latent": "mini-latent-clip.safetensors", "pixel": "mini-pixel-clip.safetensors",
         "generator": "generator.safetensors"}


def default_retrieval_captions(seed: int = 11) -> list[str]:
    """48 captions: the 12 colour-shape singles, the 24 counts, 12 relations drawn once."""
    rng = np.random.default_rng(seed)
    caps = [S.caption(S.Spec("single", c, s)) for c in S.COLORS for s in S.SHAPES]
    caps += [S.caption(S.Spec("count", c, s, n)) for n in (2, 3) for c in S.COLORS for s in S.SHAPES]
    rels = [c for c in S.all_captions() if S.parse(c).kind == "relation"]
    caps += [rels[i] for i in rng.choice(len(rels), 12, replace=False)]
    return caps


def task_sets(n: int, seed: int = EVAL_SEED) -> dict:
    """For each zero-shot task: scenes, images, the per-image candidate captions and the right index."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in ("shape", "color", "count", "relation"):
        scenes, labels, target = [], [], []
        for _ in range(n):
            if task == "count":
                spec = S.Spec("count", S.COLORS[rng.integers(4)], S.SHAPES[rng.integers(3)], int(rng.integers(1, 4)))
            else:
                spec = S.random_spec(rng, "relation" if task == "relation" else "single")
            sc = S.render_spec(spec, rng)
            o = sc.objects
            if task == "shape":
                cands = [S.Spec("single", o[0].color, s) for s in S.SHAPES]
            elif task == "color":
                cands = [S.Spec("single", c, o[0].shape) for c in S.COLORS]
            elif task == "count":
                cands = [S.Spec("count", o[0].color, o[0].shape, k) for k in (1, 2, 3)]
            else:
                a, _, b = sc.relation
                cands = [S.Spec("relation", o[a].color, o[a].shape, 2, r, o[b].color, o[b].shape) for r in S.RELATIONS]
            truth = [S.holds(sc, c) for c in cands]
            assert sum(truth) == 1, (task, sc, cands)
            scenes.append(sc)
            labels.append([S.caption(c) for c in cands])
            target.append(truth.index(True))
        out[task] = {"scenes": scenes, "images": np.stack([S.draw(s, rng) for s in scenes]),
                     "labels": labels, "target": np.array(target)}
    return out


@torch.no_grad()
def _features(kind: str, model, vae, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), chunk):
        x = images_to_tensor(images[i:i + chunk])
        f = model.encode_latents(vae.encode(x)) if kind == "latent" else model.encode_images(x)
        feats.append(F.normalize(f.float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def _text(model, texts: list[str]) -> dict:
    uniq = list(dict.fromkeys(texts))
    feats = torch.cat([F.normalize(model.encode_text(uniq[i:i + 512]).float(), dim=-1) for i in range(0, len(uniq), 512)])
    return dict(zip(uniq, feats))


def zero_shot(kind: str, model, vae, sets: dict, retrieval: dict) -> dict:
    """Accuracy in [0, 1] per task for one CLIP."""
    res = {}
    for task, d in sets.items():
        img = _features(kind, model, vae, d["images"])
        txt = _text(model, [c for row in d["labels"] for c in row])
        pred = [int(torch.stack([txt[c] for c in row]).matmul(f).argmax()) for f, row in zip(img, d["labels"])]
        res[task] = float(np.mean(np.array(pred) == d["target"]))
    caps = retrieval["captions"]
    img = _features(kind, model, vae, retrieval["images"])
    txt = _text(model, caps)
    best = (img @ torch.stack([txt[c] for c in caps]).T).argmax(1)
    res["retrieval"] = float(np.mean([S.holds(sc, retrieval["specs"][int(b)]) for sc, b in zip(retrieval["scenes"], best)]))
    return {t: res[t] for t in TASKS if t in res}


def retrieval_set(prompts: list[str] | None, per_prompt: int, seed: int = EVAL_SEED + 1) -> dict:
    caps = list(dict.fromkeys(prompts or default_retrieval_captions()))
    batch = S.render_prompts(caps, seed, per_prompt)
    return {"captions": caps, "specs": [S.parse(c) for c in caps], "scenes": batch.scenes, "images": batch.images}


def judge_scores(vae, n: int, seed: int = EVAL_SEED + 2) -> dict:
    """Judge accuracy per attribute vs ground truth, on renders and on VAE reconstructions."""
    batch = S.make_batch(seed, n)
    with torch.no_grad():
        x = images_to_tensor(batch.images)
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 256])) for i in range(0, n, 256)])
    out = {}
    for name, imgs in (("renders", list(batch.images)), ("reconstructions", list(rec))):
        acc = {"color": [], "shape": [], "count": [], "relation": []}
        verdict = []
        for img, sc, cap in zip(imgs, batch.scenes, batch.captions):
            dets = J.detect(img)
            for k, v in J.score_against_truth(dets, sc).items():
                acc[k].extend(v)
            verdict.append(J.check_detections(dets, S.parse(cap))["ok"])
        out[name] = {k: float(np.mean(v)) for k, v in acc.items()}
        out[name]["caption_verdict"] = float(np.mean(verdict))
    out["n_scenes"] = n
    return out


def vae_scores(vae, n: int, seed: int = EVAL_SEED + 3) -> dict:
    x = images_to_tensor(S.make_batch(seed, n).images)
    with torch.no_grad():
        z = vae.encode(x)
        rec = vae.decode(z)
    mse = ((rec - x) ** 2).flatten(1).mean(1)
    return {"psnr_db": float((10 * torch.log10(1 / mse)).mean()), "scale_factor": vae.scale_factor,
            "latent_std": [round(float(v), 4) for v in z.std(dim=(0, 2, 3))],
            "latent_mean": [round(float(v), 4) for v in z.mean(dim=(0, 2, 3))], "n_images": n}


def evaluate_dir(weights="weights/mini", prompts: list[str] | None = None, n: int = 400, per_prompt: int = 8,
                 judge_n: int = 600, equal_steps=None, geneval_prompts=None, geneval_seeds=None,
                 generation: bool = True) -> dict:
    """Every score of one weights directory (what ``eval`` prints and writes as JSON).

    With ``generation`` and a generator file: GenEval-mini (``geneval_prompts``: (category,
    prompt) pairs, default prompts/geneval_mini.txt) and safety-mini, both from part 2.
    """
    weights = Path(weights)
    vae = load_vae(weights / FILES["vae"])
    models = {"pixel": load_pixel_clip(weights / FILES["pixel"]), "latent": load_latent_clip(weights / FILES["latent"])}
    sets = task_sets(n)
    ret = retrieval_set(prompts, per_prompt)
    result = {"zero_shot": {k: zero_shot(k, m, vae, sets, ret) for k, m in models.items()}}
    if equal_steps is not None and Path(equal_steps).is_file():
        snap = models["latent"]
        snap.load_open_clip_state_dict({k: v.float() for k, v in torch.load(equal_steps, weights_only=True).items()}, strict=False)
        result["zero_shot_latent_equal_steps"] = zero_shot("latent", snap, vae, sets, ret)
    for part in result.values():
        part_items = part.values() if "pixel" in part else [part]
        for accs in part_items:
            accs["mean_shape_color_count_retrieval"] = float(np.mean([accs[t] for t in ("shape", "color", "count", "retrieval")]))
    result["judge"] = judge_scores(vae, judge_n)
    result["vae"] = vae_scores(vae, 512)
    result["settings"] = {"images_per_task": n, "retrieval_captions": len(ret["captions"]),
                          "retrieval_images": len(ret["scenes"]), "judge_scenes": judge_n, "seed": EVAL_SEED}
    if generation and (weights / FILES["generator"]).is_file():
        from . import geneval, safety_mini
        world = geneval.load_world(weights)
        result["geneval"] = geneval.evaluate(world, geneval_prompts, seeds=geneval_seeds or geneval.SEEDS)
        result["settings"]["geneval"] = result["geneval"].pop("settings")
        result["safety"] = safety_mini.evaluate(world)
        result["settings"]["safety"] = result["safety"].pop("settings")
    return result


def format_table(r: dict) -> str:
    zs = r["zero_shot"]
    eq = r.get("zero_shot_latent_equal_steps")
    head = f"{'task':<12}{'pixel CLIP':>12}{'Latent-CLIP':>13}" + (f"{'latent@eq.steps':>17}" if eq else "")
    lines = ["zero-shot accuracy (%)", head]
    for t in (*TASKS, "mean_shape_color_count_retrieval"):
        name = "mean(s,c,n,r)" if t.startswith("mean") else t
        row = f"{name:<12}{100 * zs['pixel'][t]:>12.1f}{100 * zs['latent'][t]:>13.1f}"
        lines.append(row + (f"{100 * eq[t]:>17.1f}" if eq else ""))
    j = r["judge"]
    lines += ["", f"judge accuracy (%) on {j['n_scenes']} held-out scenes", f"{'attribute':<16}{'renders':>10}{'VAE recon':>11}"]
    for k in ("color", "shape", "count", "relation", "caption_verdict"):
        lines.append(f"{k:<16}{100 * j['renders'][k]:>10.1f}{100 * j['reconstructions'][k]:>11.1f}")
    v = r["vae"]
    lines += ["", f"VAE: PSNR {v['psnr_db']:.2f} dB, scale_factor {v['scale_factor']:.4f}, latent std {v['latent_std']}"]
    if "geneval" in r:
        from . import geneval, safety_mini
        lines += ["", geneval.format_table(r["geneval"]), "", safety_mini.format_table(r["safety"])]
    return "\n".join(lines)


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as f:   # never over a file that appeared meanwhile
        f.write(json.dumps(result, indent=2) + "\n")
    return path
