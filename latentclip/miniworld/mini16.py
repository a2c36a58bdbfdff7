"""The mini-world on a 16-channel VAE: Latent-CLIP for another VAE by distillation, proved in miniature.

Family ``mini16`` (``weights/mini16/``): a mini VAE of the shipped architecture with 16 latent
channels, the shipped generator's recipe on its latents, and a Latent-CLIP *distilled* from the
shipped mini pixel CLIP (``weights/mini/mini-pixel-clip.safetensors``) instead of trained
contrastively from scratch:

* the student's image tower reads the 16-channel latents; its transformer starts from the
  teacher's image transformer (same width and depth; the patch embedding is new and the position
  table is pooled from the teacher's 8x8 grid to the student's 4x4) and regresses the teacher's
  normalised image embedding of the same scene (``distill_loss.cosine_regression``);
* the teacher's text tower is copied and frozen, so every text embedding (and every head trained
  on the teacher's image embeddings) is the teacher's;
* a caption-contrastive term (``distill_loss.caption_contrastive``) against the frozen text
  embeddings of the scenes' captions, with hard negatives (the same objects, the relation word
  swapped), and a relation term over those hard negatives alone (``relation_choice_loss``) teach
  relations the teacher itself does not know (its text tower barely reads word order, so this takes
  the student thousands of steps: docs/miniworld_mini16.md, "Relations");
* the cosine term also sees the generator's x0 predictions along the search sampler
  (``generated_pool``), the latents an FK verifier scores: a student distilled on rendered scenes
  alone ranked early-step particles far worse than decode + teacher did.

Then a head (``latentclip.heads``) is trained on the teacher's image embeddings and measured,
unchanged, on the student's. ``train_family`` runs it all in two single-thread workers and writes
a manifest; a seed gives the same tensors.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import clips as _clips
from . import generator as _gen
from . import scenes as S
from . import train as _train
from .. import checkpoints as _ckpt
from ..caption_targets import caption_consistent_targets
from ..configs import WEIGHTS_DIR
from ..distill_loss import caption_contrastive, cosine_regression, hard_negative_choice, hard_negative_margin
from ..model import LatentCLIP
from .vae import images_to_tensor, load_vae, save_vae

FAMILY = "mini16"
CHANNELS = 16
TEACHER = WEIGHTS_DIR / "mini" / "mini-pixel-clip.safetensors"
#: The 4-channel contrastive Latent-CLIP the distillation is compared with.
CONTRASTIVE_DIR = WEIGHTS_DIR / "mini"
FILES = {"vae": "mini16-vae.safetensors", "generator": "mini16-generator.safetensors",
         "latent": "mini16-latent-clip.safetensors", "head": "mini-head-triangle.safetensors"}
#: The student: the shipped Latent-CLIP config on 16-channel latents, family mini16.
STUDENT_CFG = copy.deepcopy(_clips.LATENT_CFG)
STUDENT_CFG["vae_family"] = FAMILY
STUDENT_CFG["vision_cfg"]["latent_channels"] = CHANNELS

RECIPE = {
    # warm start from the 4-channel mini VAE's trunk (all but the two convs that touch the latent), as CPU is short
    "vae": {**_train.RECIPE["vae"], "latent_channels": CHANNELS, "steps": 60,
            "init_from": str(WEIGHTS_DIR / "mini" / "mini-vae.safetensors")},
    # the shipped generator's recipe, warm-started from it (all but the latent-side convs), shortened for the CPU
    "generator": {**_gen.RECIPE, "steps": 250, "batch": 64, "pool": 4000, "lr": 2e-3, "warmup": 10,
                  "init_from": str(WEIGHTS_DIR / "mini" / _gen.FILE)},
    # the shipped student's recipe, chosen on a validation split (tools/mini16_recipe_search.py): the
    # hard-negative relation term (relation_choice_loss) at weight 0.3, scale 1000, and 3000 steps, as the
    # student learns which object is left of which slowly (docs/miniworld_mini16.md, "Relations").
    # generated_*: 32 rows a step of the generator's x0 predictions along search-mini's sampler (generated_pool,
    # 2000 training-stream captions x 8 steps), so the student agrees with decode + teacher on what FK scores
    # (docs/miniworld_mini16.md, "FK: distilling on the generator's x0 predictions").
    # trajectory_every: held-out zero-shot scores recorded along the run (off the training clock).
    "student": {"steps": 3000, "batch": 128, "lr": 3e-3, "warmup": 10, "weight_decay": 0.05, "pool": 24000,
                "contrastive_weight": 0.3, "contrastive_logit_scale": 20.0, "init_from_teacher": True,
                "relation_weight": 0.3, "relation_logit_scale": 1000.0, "generated_prompts": 2000,
                "generated_rows": 32, "trajectory_every": 250},
    "head": {"labels": ["no triangle", "triangle"], "hidden": 64, "train_scenes": 6000, "test_scenes": 1000,
             "steps": 300, "lr": 1e-2, "weight_decay": 1e-4},
    "threads_per_worker": 1,
}
#: The compute comparison's student (issue 23: reach the contrastive model's zero-shot mean in at most 1/5 of
#: its training CPU): 950 steps, so the whole cosine schedule fits the budget, with the throw-away order and
#: count heads (``distill``'s ``order_weight``, ``count_weight``) that make the image tower compute a relation's
#: order in hundreds of steps instead of thousands; no generated rows (they cost 8% a step); caption-consistent
#: targets (``target_margin``, ``target_pull``), so the cosine term stops pulling towards the teacher's order
#: confusion; the normalised-gap hinge over both word orders (``gap_weight``), so captions the teacher's text
#: tower nearly merges are told apart too. Chosen on the validation split over 30 retrieval draws
#: (docs/miniworld_mini16.md, "Order and count heads", "Caption-consistent targets", "Normalised gaps").
#: Retrained by ``train --family mini16 --only student --student-recipe fast``; not the shipped student.
FAST_STUDENT = {**RECIPE["student"], "steps": 950, "lr": 3.5e-3, "warmup": 50, "contrastive_weight": 0.7,
                "generated_prompts": 0, "relation_share": 0.65, "order_weight": 1.0, "count_weight": 1.0,
                "target_margin": 0.005, "target_pull": 0.01, "gap_weight": 10.0, "gap_margin": 0.01, "gap_both_orders": True}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the student -------------------------------------------------------------------------------
def build_student(teacher, init_from_teacher: bool = True, cfg: dict | None = None) -> LatentCLIP:
    """A 16-channel Latent-CLIP holding the teacher's text tower (frozen) and, optionally, its
    image transformer; only the image tower is trainable. ``cfg``: another student config."""
    student = LatentCLIP(cfg or STUDENT_CFG)
    tsd = teacher.clip.state_dict()
    ssd = student.clip.state_dict()
    load = {k: v for k, v in tsd.items() if not k.startswith("visual.")}
    if init_from_teacher:
        for k, v in tsd.items():
            if k.startswith("visual.") and k in ssd and ssd[k].shape == v.shape:
                load[k] = v
        pos = tsd["visual.positional_embedding"]       # [1 + 8*8, W] -> [1 + 4*4, W]
        g, gs = int(round((pos.shape[0] - 1) ** 0.5)), int(round((ssd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.adaptive_avg_pool2d(grid, gs).permute(0, 2, 3, 1).reshape(gs * gs, -1)
        load["visual.positional_embedding"] = torch.cat([pos[:1], grid])
    missing, unexpected = student.clip.load_state_dict(load, strict=False)
    assert not unexpected, unexpected
    for name, p in student.clip.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    return student


def _shared_batch_order(seed: int, truesets, steps: int, batch: int, share: float) -> np.ndarray:
    """Batches whose share of relation scenes is ``share`` (the pool's own share is about half): the
    relation term, the slowest to learn, sees more scenes a step at the same cost. Each kind is its own
    stream of shuffles, as ``train.batch_order``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"recipe['relation_share'] must be between 0 and 1, got {share}")
    is_rel = np.array([any(S.parse(c).kind == "relation" for c in t) for t in truesets])
    rel, other = np.flatnonzero(is_rel), np.flatnonzero(~is_rel)
    k = int(round(share * batch))
    a = rel[_train.batch_order(seed, len(rel), steps, k)] if k else np.zeros((steps, 0), dtype=int)
    b = other[_train.batch_order(seed + 7, len(other), steps, batch - k)] if batch - k else np.zeros((steps, 0), dtype=int)
    return np.concatenate([a, b], axis=1)


def _conflict_free(idx, captions, truesets) -> list[int]:
    """Batch positions whose captions are false for every other kept image (no false negatives)."""
    keep = []
    for pos, i in enumerate(idx):
        c = captions[i]
        if any(c == captions[idx[k]] or c in truesets[idx[k]] or captions[idx[k]] in truesets[i] for k in keep):
            continue
        keep.append(pos)
    return keep


def relation_caption(spec: S.Spec, relation: str, swapped: bool = False) -> str:
    """The caption of a relation spec's two objects with ``relation`` (the objects in the other word order
    when ``swapped``): the hard negatives and alternative wordings every relation term is built from."""
    a, b = ((spec.color2, spec.shape2), (spec.color, spec.shape)) if swapped else ((spec.color, spec.shape), (spec.color2, spec.shape2))
    return S.caption(S.Spec("relation", a[0], a[1], 2, relation, b[0], b[1]))


def _hard_negatives(caps: list[str], kept_truesets: list[set], both_orders: bool = False) -> list[str]:
    """For each relation caption: the same ordered pair in the three other relations (``both_orders``: and the
    other word order in all four), unless true of a kept image."""
    out = []
    for c in caps:
        spec = S.parse(c)
        if spec.kind != "relation":
            continue
        cands = [relation_caption(spec, r) for r in S.RELATIONS if r != spec.relation]
        if both_orders:
            cands += [relation_caption(spec, r, swapped=True) for r in S.RELATIONS]
        for neg in cands:
            if not any(neg in t for t in kept_truesets) and neg not in out:
                out.append(neg)
    return out


def _relation_choices(idx, truesets, both_orders: bool = False) -> tuple[list[int], list[list[str]]]:
    """For each true relation caption of the batch's scenes: (batch position, [the caption, then the same
    ordered pair with each other relation word that is false of that scene]). ``both_orders``: the other
    word order's false captions join them ("B left of A" against "A below B"), the confusion a
    retrieval over both wordings meets."""
    rows, options = [], []
    for pos, i in enumerate(idx):
        for c in sorted(truesets[i]):
            spec = S.parse(c)
            if spec.kind != "relation":
                continue
            negs = [relation_caption(spec, r) for r in S.RELATIONS if r != spec.relation]
            if both_orders:
                negs += [relation_caption(spec, r, swapped=True) for r in S.RELATIONS]
            rows.append(pos)
            options.append([c] + [n for n in negs if n not in truesets[i]])
    return rows, options


def relation_choice_table(truesets, text: dict, both_orders: bool = False) -> dict:
    """``_relation_choices`` for every scene of a pool at once, as index tensors into one text matrix, so a
    training step gathers its rows instead of parsing captions and stacking embeddings (most of the relation
    terms' cost). ``relation_choice_loss(..., table=)`` gives the same tensors, hence the same loss, as
    without it."""
    names = list(text)
    where = {c: k for k, c in enumerate(names)}
    counts, flat = [], []
    for i in range(len(truesets)):
        _, options = _relation_choices([i], truesets, both_orders)
        counts.append(len(options))
        flat.extend(options)
    k = max((len(o) for o in flat), default=1)
    counts = torch.tensor(counts, dtype=torch.long)
    return {"text": torch.stack([text[c] for c in names]),
            "index": torch.tensor([[where[o[min(j, len(o) - 1)]] for j in range(k)] for o in flat],
                                  dtype=torch.long).reshape(-1, k),
            "width": torch.tensor([len(o) for o in flat], dtype=torch.long),
            "counts": counts, "starts": torch.cumsum(counts, 0) - counts}


def _table_rows(table: dict, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch position, table row) of every relation choice of the batch's scenes, in ``_relation_choices``'s order."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    c = table["counts"][idx]
    pos = torch.repeat_interleave(torch.arange(len(idx)), c)
    offset = torch.arange(int(c.sum())) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
    return pos, torch.repeat_interleave(table["starts"][idx], c) + offset


def order_labels(idx, truesets) -> tuple[list[int], list[int]]:
    """For each relation scene of the batch whose two objects differ: (batch position, where the object
    that sorts first by (colour, shape) lies relative to the other, as an index into ``S.RELATIONS``).
    The target of ``recipe['order_weight']``'s throw-away head: one label per scene, the same for every
    pair, so the image tower is asked for the order itself rather than for each pair's text direction."""
    rows, labels = [], []
    for k, i in enumerate(idx):
        for c in truesets[i]:
            spec = S.parse(c)
            if spec.kind != "relation":
                continue
            a, b = (spec.color, spec.shape), (spec.color2, spec.shape2)
            if a != b:
                rel = spec.relation if a < b else _INVERSE[spec.relation]
                rows.append(k)
                labels.append(S.RELATIONS.index(rel))
            break
    return rows, labels


def count_labels(idx, truesets) -> list[int]:
    """How many objects each scene of the batch holds, less one (a class index for ``recipe['count_weight']``'s
    throw-away head): one for a single object, two for a relation, the count of a count caption."""
    out = []
    for i in idx:
        spec = S.parse(next(iter(truesets[i])))
        out.append({"single": 1, "relation": 2}.get(spec.kind, spec.count) - 1)
    return out


def pool_caption_targets(target, truesets, text: dict, margin: float, pull: float, normalise_gap: bool = False):
    """``caption_targets.caption_consistent_targets`` for a pool: the truth of every caption of the grammar
    (``text``'s keys) from each scene's true captions. Returns (targets, stats)."""
    captions = list(text)
    where = {c: i for i, c in enumerate(captions)}
    truth = torch.zeros(len(truesets), len(captions), dtype=torch.bool)
    for i, t in enumerate(truesets):
        truth[i, [where[c] for c in t]] = True
    return caption_consistent_targets(target, torch.stack([text[c] for c in captions]), truth, margin, pull,
                                      normalise_gap=normalise_gap)


def relation_choice_loss(emb, idx, truesets, text: dict, logit_scale: float, margin: float | None = None,
                         both_orders: bool = False, normalise_gap: bool = False, table: dict | None = None):
    """``hard_negative_choice`` (or, with ``margin``, ``hard_negative_margin``, its gaps normalised with
    ``normalise_gap``) over every true relation caption of the batch and its relation swaps, or None when
    the batch holds no relation scene. ``table``: ``relation_choice_table(truesets, text, both_orders)``,
    built once for the pool (the same loss, faster); without it one is built for the batch's scenes."""
    if table is None:
        table, idx = relation_choice_table([truesets[i] for i in idx], text, both_orders), range(len(idx))
    pos, rows = _table_rows(table, idx)
    if not len(rows):
        return None
    width = table["width"][rows]
    k = int(width.max())
    opts = table["text"][table["index"][rows, :k]]
    mask = torch.arange(k) < width[:, None]
    if margin is not None:
        return hard_negative_margin(emb[pos], opts, margin, mask, normalise_gap)
    return hard_negative_choice(emb[pos], opts, logit_scale, mask)


_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def symmetric_relation_loss(emb, idx, truesets, text: dict, logit_scale: float):
    """Cross-entropy over the four relations of each relation scene of the batch, each relation scored
    in both word orders at once: ``cos(e, "A r B") + cos(e, "B inverse(r) A")``.

    The teacher's text tower is nearly order-blind, so "A left of B" vs "A right of B" and "B right of A"
    vs "B left of A" pull an image along largely opposite directions; scoring both orders together
    leaves only the direction they agree on (None when the batch holds no relation scene)."""
    rows, first, second = [], [], []
    for pos, i in enumerate(idx):
        rel = sorted(c for c in truesets[i] if S.parse(c).kind == "relation")
        if not rel:
            continue
        spec = S.parse(rel[0])
        order = [spec.relation] + [r for r in S.RELATIONS if r != spec.relation]
        rows.append(pos)
        first.append([text[relation_caption(spec, r)] for r in order])
        second.append([text[relation_caption(spec, _INVERSE[r], swapped=True)] for r in order])
    if not rows:
        return None
    img = F.normalize(emb[torch.as_tensor(rows)].float(), dim=-1)
    both = torch.stack([torch.stack(o) for o in first]) + torch.stack([torch.stack(o) for o in second])
    logits = logit_scale * 0.5 * torch.einsum("ne,nke->nk", img, both)
    return F.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long))


@torch.no_grad()
def teacher_image_embeddings(teacher, images: np.ndarray, chunk: int = 500) -> torch.Tensor:
    return torch.cat([F.normalize(teacher.encode_images(images_to_tensor(images[i:i + chunk])).float(), dim=-1)
                      for i in range(0, len(images), chunk)])


@torch.no_grad()
def teacher_text_embeddings(teacher, texts: list[str]) -> dict:
    feats = torch.cat([F.normalize(teacher.encode_text(texts[i:i + 256]).float(), dim=-1) for i in range(0, len(texts), 256)])
    return dict(zip(texts, feats))


def teacher_targets(teacher, seed: int, pool: int) -> tuple[torch.Tensor, float]:
    """The teacher's normalised image embeddings of the student's pool, and the CPU seconds they took
    (pre-encoding needs no VAE, so it can run before the VAE is trained)."""
    c0 = time.process_time()
    images, _, _ = _train.make_pool(seed, pool)
    return teacher_image_embeddings(teacher, images), time.process_time() - c0


#: Seed offset of the generated pool's captions and noises (apart from every other stream's).
GENERATED_SEED = 6_100_003


@torch.no_grad()
def generated_pool(generator, vae, teacher, seed: int, prompts: int, chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The latents a verifier meets during search, with the teacher's embeddings of their decodes.

    For ``prompts`` captions of the training stream (their own seed, never the evaluation's prompts or
    seeds), the generator samples with search-mini's stochastic sampler (``search.STEPS`` steps, eta 1)
    and every step's x0 prediction of the new state (what FK steering scores) is kept: blurry early,
    sharp late, none of them a rendered scene's latent. Targets are the teacher's normalised
    embeddings of their VAE decodes, so the student learns to agree with decode + teacher there.
    Returns (raw latents [prompts x steps, C, 8, 8], targets, CPU seconds)."""
    from .generator import noise_for
    from .search import ETA, STEPS, stochastic_advance
    c0 = time.process_time()
    _, captions, _ = _train.make_pool(seed + GENERATED_SEED, prompts)
    lats, targets = [], []
    for i in range(0, prompts, chunk):
        caps = captions[i:i + chunk]
        cond = generator.prepare(caps, len(caps))
        advance = stochastic_advance(generator, cond, len(caps), STEPS, ETA, seed=seed + GENERATED_SEED + i, lookahead=True)
        noise = noise_for(range(GENERATED_SEED + seed * 100_003 + i, GENERATED_SEED + seed * 100_003 + i + len(caps)),
                          channels=generator.latent_channels)
        _, x0s, _ = advance(noise, 0, STEPS)
        lat = torch.cat(x0s)
        lats.append(lat)
        targets.append(F.normalize(teacher.encode_images(vae.decode(lat)).float(), dim=-1))
    return torch.cat(lats), torch.cat(targets), time.process_time() - c0


def encoded_pool(vae, seed: int, pool: int) -> tuple[torch.Tensor, list[str], list[set]]:
    """The student's training pool (the 4-channel CLIPs' stream): latents, one caption and the true captions per scene."""
    images, captions, truesets = _train.make_pool(seed, pool)
    return _train.encode_pool(vae, images), captions, truesets


def distill(vae, teacher, seed: int, recipe: dict | None = None, progress_every: int = 50, targets=None, pool=None,
            probe=None, generator=None, generated=None):
    """Distil the student; returns (student, info). ``info['train_cpu_seconds']`` is the CPU time of
    the training steps alone (the pool's latents and teacher embeddings, pre-encoding, are timed apart).
    ``targets``: ``teacher_targets(teacher, seed, pool)`` and ``pool``: ``encoded_pool(vae, seed, pool)``,
    computed beforehand (the same tensors; a recipe search reuses them across runs).
    ``probe``: called with the student every ``recipe['trajectory_every']`` steps and at the end; its
    dict joins ``info['trajectory']`` with the step and the training CPU seconds so far (the probe's own
    time is kept off that clock), so a run records when it reached a score, not only where it ended.
    ``recipe['generated_prompts']`` > 0: each step also regresses ``recipe['generated_rows']`` latents of
    ``generated_pool`` (the generator's x0 predictions; needs ``generator``, or ``generated``: that
    pool computed beforehand) to the teacher's embeddings of their decodes (cosine term only).
    ``recipe['relation_share']`` (absent: the pool's own mix): the share of relation scenes in every batch.
    ``recipe['order_weight']`` / ``recipe['count_weight']``: cross-entropy of a linear head on the normalised
    embedding (logits times ``order_logit_scale``, default 10), trained with the student and thrown away,
    reading where the first-sorted object of a relation lies (``order_labels``) / how many objects a scene
    holds (``count_labels``): the image tower is asked for the order itself, which the relation term asks for
    only through each pair's own text direction. ``recipe['negatives_both_orders']``: the contrastive term's
    hard negatives also hold the other word order's false captions.
    ``recipe['gap_weight']`` (absent or 0: off): a hinge on each true relation caption's lead over its relation
    swaps (``recipe['gap_both_orders']``: and the other word order's false captions), each lead divided by the
    two captions' text distance (``hard_negative_margin``'s ``normalise_gap``) and asked to reach
    ``recipe['gap_margin']`` (default 0.1): the teacher's text tower nearly merges "A above B" and "A below B",
    so the raw lead such a pair can get is tiny and both the softmax and the raw hinge all but ignore it.
    ``recipe['target_margin']`` (absent or 0: off): the cosine term regresses to caption-consistent targets
    (``pool_caption_targets`` with that margin and ``recipe['target_pull']``, default 0.1), computed on the
    training clock (``recipe['target_gap_normalised']``: each lead divided by the two captions' text distance, as
    ``gap_weight``'s); the teacher's text tower reads little word order, so its own image embeddings score
    false wordings of a relation as high as true ones and the plain cosine term pulls against the relation terms."""
    r = {**RECIPE["student"], **(recipe or {})}
    n_gen = int(r.get("generated_prompts") or 0)
    if n_gen and generated is None and generator is None:
        raise ValueError("recipe['generated_prompts'] needs the generator (distill(..., generator=...))")
    torch.manual_seed(seed + 21)
    c0, w0 = time.process_time(), time.time()
    latents, captions, truesets = pool if pool is not None else encoded_pool(vae, seed, r["pool"])
    target, target_cpu = targets if targets is not None else teacher_targets(teacher, seed, r["pool"])
    text = teacher_text_embeddings(teacher, S.all_captions())
    gen_cpu = 0.0
    if n_gen:
        gen_lat, gen_target, gen_cpu = generated if generated is not None else generated_pool(generator, vae, teacher, seed, n_gen)
        gen_order = _train.batch_order(seed + 3, len(gen_lat), r["steps"], r["generated_rows"])
    # teacher_cpu_seconds: the teacher's share (rendering and embedding the pool); it serves every VAE family,
    # as the teacher never sees a latent, while the latents are each family's own
    pre = {"cpu_seconds": round(time.process_time() - c0 + target_cpu + (gen_cpu if generated is not None else 0.0), 1),
           "teacher_cpu_seconds": round(target_cpu, 1), "wall_seconds": round(time.time() - w0, 1)}
    if n_gen:
        pre["generated_cpu_seconds"] = round(gen_cpu, 1)
    log(f"student: pool of {r['pool']} pre-encoded (latents + teacher embeddings) in {pre['cpu_seconds']} s CPU")
    student = build_student(teacher, r["init_from_teacher"], r.get("config"))
    params = [p for p in student.clip.parameters() if p.requires_grad]
    decay = [p for n, p in student.clip.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in student.clip.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": r["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    order_head = None
    if r.get("order_weight"):
        # trained with the student and thrown away: it only shapes what the embedding holds
        order_head = torch.nn.Linear(student.clip.text_projection.shape[1], len(S.RELATIONS))
        groups.append({"params": list(order_head.parameters()), "weight_decay": 0.0})
    count_head = None
    if r.get("count_weight"):
        count_head = torch.nn.Linear(student.clip.text_projection.shape[1], 3)
        groups.append({"params": list(count_head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=r["lr"], betas=(0.9, 0.98), eps=1e-6)
    if r.get("relation_share") is not None:
        order = _shared_batch_order(seed + 1, truesets, r["steps"], r["batch"], float(r["relation_share"]))
    else:
        order = _train.batch_order(seed + 1, len(captions), r["steps"], r["batch"])
    student.train()
    c1, w1, ema, trajectory, probe_cpu = time.process_time(), time.time(), {}, [], 0.0
    correction = None
    if r.get("target_margin"):
        # on the training clock: it exists for this run's recipe, unlike the pool's pre-encoding
        target, correction = pool_caption_targets(target, truesets, text, float(r["target_margin"]),
                                                  float(r.get("target_pull", 0.1)), bool(r.get("target_gap_normalised")))
        log(f"student: caption-consistent targets: {correction}")
    # the relation terms' choices, indexed once for the pool (on the training clock)
    tables = {}
    if r.get("relation_weight") and not r.get("relation_symmetric"):
        tables.setdefault(bool(r.get("relation_both_orders")),
                          relation_choice_table(truesets, text, bool(r.get("relation_both_orders"))))
    if r.get("gap_weight"):
        both = bool(r.get("gap_both_orders"))
        if both not in tables:
            tables[both] = relation_choice_table(truesets, text, both)
    every = int(r.get("trajectory_every") or 0) if probe is not None else 0
    for step in range(r["steps"]):
        for g in opt.param_groups:
            g["lr"] = _train._cosine_lr(step, r["steps"], r["lr"], r["warmup"])
        idx = order[step]
        emb = student.encode_latents(latents[torch.as_tensor(idx)], check=False)
        loss = cosine_regression(emb, target[torch.as_tensor(idx)])
        parts = {"cosine": float(loss.detach())}
        if n_gen:
            gidx = torch.as_tensor(gen_order[step])
            gen = cosine_regression(student.encode_latents(gen_lat[gidx], check=False), gen_target[gidx])
            loss = (loss * len(idx) + gen * len(gidx)) / (len(idx) + len(gidx))
            parts["cosine_generated"] = float(gen.detach())
        if r["contrastive_weight"]:
            keep = _conflict_free(idx, captions, truesets)
            caps = [captions[idx[k]] for k in keep]
            negs = _hard_negatives(caps, [truesets[idx[k]] for k in keep], bool(r.get("negatives_both_orders")))
            con = caption_contrastive(emb[keep], torch.stack([text[c] for c in caps]), r["contrastive_logit_scale"],
                                      torch.stack([text[c] for c in negs]) if negs else None)
            loss = loss + r["contrastive_weight"] * con
            parts["contrastive"] = float(con.detach())
        if r.get("relation_weight"):
            if r.get("relation_symmetric"):
                rel = symmetric_relation_loss(emb, idx, truesets, text, r["relation_logit_scale"])
            else:
                rel = relation_choice_loss(emb, idx, truesets, text, r.get("relation_logit_scale", 0.0),
                                           r.get("relation_margin"), bool(r.get("relation_both_orders")),
                                           table=tables[bool(r.get("relation_both_orders"))])
            if rel is not None:
                loss = loss + r["relation_weight"] * rel
                parts["relation"] = float(rel.detach())
        if r.get("gap_weight"):
            gap = relation_choice_loss(emb, idx, truesets, text, 0.0, float(r.get("gap_margin", 0.1)),
                                       bool(r.get("gap_both_orders")), normalise_gap=True,
                                       table=tables[bool(r.get("gap_both_orders"))])
            if gap is not None:
                loss = loss + r["gap_weight"] * gap
                parts["gap"] = float(gap.detach())
        if order_head is not None:
            rows, labels = order_labels(idx, truesets)
            if rows:
                logits = order_head(F.normalize(emb[torch.as_tensor(rows)], dim=-1)) * r.get("order_logit_scale", 10.0)
                order_loss = F.cross_entropy(logits, torch.as_tensor(labels))
                loss = loss + r["order_weight"] * order_loss
                parts["order"] = float(order_loss.detach())
        if count_head is not None:
            logits = count_head(F.normalize(emb, dim=-1)) * r.get("order_logit_scale", 10.0)
            count_loss = F.cross_entropy(logits, torch.as_tensor(count_labels(idx, truesets)))
            loss = loss + r["count_weight"] * count_loss
            parts["count"] = float(count_loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in parts.items()}
        if every and ((step + 1) % every == 0 or step == r["steps"] - 1):
            p0 = time.process_time()
            trajectory.append({"step": step + 1, "train_cpu_seconds": round(p0 - c1 - probe_cpu, 1),
                               **_probe(student, probe)})
            probe_cpu += time.process_time() - p0
        if step % progress_every == 0 or step == r["steps"] - 1:
            cpu = time.process_time() - c1 - probe_cpu
            log(f"student step {step + 1}/{r['steps']} " + " ".join(f"{k} {v:.4f}" for k, v in ema.items())
                + f" ({cpu / (step + 1):.3f} s CPU/step, {cpu:.0f} s CPU)")
    student.eval().requires_grad_(False)
    info = {"train_cpu_seconds": round(time.process_time() - c1 - probe_cpu, 1),
            "train_wall_seconds": round(time.time() - w1, 1),
            "steps": r["steps"], "pre_encoding": pre, "final_losses": {k: round(v, 5) for k, v in ema.items()},
            "trained_parameters": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in student.clip.parameters()), "recipe": r}
    if correction is not None:
        info["target_correction"] = correction
    if trajectory:
        info["trajectory"] = trajectory
        info["probe_cpu_seconds"] = round(probe_cpu, 1)
    return student, info


def _probe(student, probe) -> dict:
    """Run ``probe`` on the student in eval mode without gradients, then put it back to training."""
    student.eval()
    try:
        with torch.no_grad():
            return probe(student)
    finally:
        student.train()


def zero_shot_probe(vae, n: int = 400):
    """A ``distill`` probe: the student's held-out zero-shot scores (``eval --family mini16``'s sets), the
    record the distillation target is read from ("reaches the contrastive model's mean, in how much CPU")."""
    from . import eval as E
    held_out = {}   # rendered on the first call: a run without a trajectory never needs them

    def probe(student) -> dict:
        if not held_out:
            held_out.update(sets=E.task_sets(n), ret=E.retrieval_set(None, 8))
        zs = E.zero_shot("latent", student, vae, held_out["sets"], held_out["ret"])
        return {**{k: round(v, 4) for k, v in zs.items()}, "mean_shape_color_count_retrieval": round(_mean4(zs), 5)}
    return probe


# -- the head ------------------------------------------------------------------------------------
HEAD_WHAT = "whether the scene shows a triangle (the safety-mini concept), from the image embedding"
HEAD_SEED = 4_200_017


def triangle_labels(scenes) -> torch.Tensor:
    return torch.tensor([int(any(o.shape == "triangle" for o in sc.objects)) for sc in scenes])


def train_head(teacher, seed: int, recipe: dict | None = None):
    """A head on the teacher's image embeddings of training-stream scenes (full batch, deterministic)."""
    from ..heads import Head
    r = {**RECIPE["head"], **(recipe or {})}
    torch.manual_seed(seed + 31)
    batch = S.make_batch(HEAD_SEED + seed, r["train_scenes"])
    x, y = teacher_image_embeddings(teacher, batch.images), triangle_labels(batch.scenes)
    head = Head(x.shape[1], r["labels"], r["hidden"], HEAD_WHAT, "mini-pixel-clip")
    opt = torch.optim.AdamW(head.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    for _ in range(r["steps"]):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval().requires_grad_(False)
    return head, {"final_loss": round(float(loss.detach()), 5), "train_scenes": r["train_scenes"],
                  "train_accuracy": float((head(x).argmax(1) == y).float().mean())}


@torch.no_grad()
def head_transfer(head, teacher, vae, student, n: int = 1000, seed: int = 0) -> dict:
    """The head's accuracy on held-out scenes: on the teacher's pixel embeddings and, unchanged, on
    the student's embeddings of the 16-channel latents of the same images."""
    from .eval import EVAL_SEED
    batch = S.make_batch(EVAL_SEED + 5 + seed, n)
    y = triangle_labels(batch.scenes)
    t = head(teacher_image_embeddings(teacher, batch.images)).argmax(1)
    lat = _train.encode_pool(vae, batch.images)
    s = head(torch.cat([student.encode_latents(lat[i:i + 500]) for i in range(0, n, 500)])).argmax(1)
    ta, sa = float((t == y).float().mean()), float((s == y).float().mean())
    return {"teacher_accuracy": ta, "student_accuracy": sa, "ratio": sa / ta if ta else 0.0,
            "agreement": float((t == s).float().mean()), "positives": float(y.float().mean()), "n_scenes": n}


# -- cost of the contrastive recipe on this machine --------------------------------------------
def contrastive_cpu_per_step(seed: int = 0, steps: int = 30) -> dict:
    """CPU seconds per step of the shipped contrastive Latent-CLIP's recipe (``train.train_clip`` on
    4-channel latents), measured now: the same clock as the student's, on the same machine."""
    from .vae import load_vae as _load
    vae4 = _load(CONTRASTIVE_DIR / "mini-vae.safetensors")
    r = _train.RECIPE
    images, captions, truesets = _train.make_pool(seed, steps * r["clip"]["batch"])
    lat = _train.encode_pool(vae4, images)
    c0 = time.process_time()
    _train.train_clip("latent", seed, r, lat, captions, truesets, steps, progress_every=10 ** 9)
    per = (time.process_time() - c0) / steps
    return {"cpu_seconds_per_step": round(per, 4), "steps_measured": steps,
            "recipe_steps": r["clip"]["latent_steps"], "cpu_seconds": round(per * r["clip"]["latent_steps"], 1)}


# -- orchestration -------------------------------------------------------------------------------
def _wait_for(path: Path) -> None:
    while not path.is_file():   # written atomically; if the other worker fails, the parent stops this one
        time.sleep(1)


def stage_a(seed: int, recipe: dict, out: Path) -> dict:
    """Worker A: the VAE, then the generator on its latents."""
    info = {}
    c0 = time.process_time()
    torch.set_num_threads(recipe["vae"].get("threads", recipe["threads_per_worker"]))  # bitwise: per recipe
    vae, info["vae"] = _train.train_vae(seed, recipe)
    torch.set_num_threads(recipe["threads_per_worker"])
    info["vae"]["cpu_seconds"] = round(time.process_time() - c0, 1)
    save_vae(vae, out / FILES["vae"], {"seed": str(seed), "family": FAMILY})
    c0 = time.process_time()
    gen, info["generator"] = _gen.train_generator(vae, seed, recipe["generator"], log=log)
    info["generator"]["cpu_seconds"] = round(time.process_time() - c0, 1)
    _gen.save_generator(gen, out / FILES["generator"], {"seed": seed, "family": FAMILY})
    return info


def stage_b(seed: int, recipe: dict, out: Path) -> dict:
    """Worker B: once the VAE (and, for a recipe with generated rows, the generator) is written, the
    student; then ``stage_head``."""
    info = {}
    teacher = _clips.load_pixel_clip(TEACHER)
    _wait_for(out / FILES["vae"])
    vae = load_vae(out / FILES["vae"])
    student, info["student"] = distill(vae, teacher, seed, recipe["student"], probe=zero_shot_probe(vae),
                                       generator=_generator_for(recipe["student"], out, wait=True))
    _ckpt.save(student, out / FILES["latent"], dtype="fp16")
    info.update(stage_head(seed, recipe, out, teacher))
    return info


def _generator_for(student_recipe: dict, folder: Path, wait: bool = False):
    """The folder's generator when the student's recipe samples generated rows, else None (not loaded).
    ``wait``: the other worker is still training it."""
    if not student_recipe.get("generated_prompts"):
        return None
    if wait:
        _wait_for(folder / FILES["generator"])
    return _gen.load_generator(folder / FILES["generator"])


def stage_head(seed: int, recipe: dict, out: Path, teacher=None) -> dict:
    """The head (teacher embeddings only) and the contrastive recipe's cost: independent of the VAE."""
    from ..heads import save_head
    teacher = teacher or _clips.load_pixel_clip(TEACHER)
    info = {}
    head, info["head"] = train_head(teacher, seed, recipe["head"])
    save_head(head, out / FILES["head"], {"seed": seed, "family_of_student": FAMILY})
    info["contrastive_cost"] = contrastive_cpu_per_step(seed)
    return info


def _worker(which: str, seed: int, recipe: dict, out: str, queue) -> None:
    torch.set_num_threads(recipe["threads_per_worker"])
    try:
        info = (stage_a if which == "a" else stage_b)(seed, recipe, Path(out))
        queue.put((which, info, None))
    except BaseException as e:  # report, do not hang the parent
        import traceback
        queue.put((which, None, traceback.format_exc()))
        raise SystemExit(1) from e


def train_family(out="weights/mini16", seed: int = 0, recipe: dict | None = None, evaluate: bool = True) -> Path:
    """Train every mini16 model into a fresh directory, evaluate, write the manifest, move it to ``out``."""
    recipe = recipe or RECIPE
    t0 = time.time()
    out, tmp = _train.fresh_training_dir(out)
    with _train.removed_on_failure(tmp):
        info = _train.run_workers(_worker, ("a", "b"), seed, recipe, tmp, "the mini16 family")
        scores = None
        if evaluate:
            torch.set_num_threads(recipe["threads_per_worker"])
            scores = evaluate_family(tmp, info=info)
        write_manifest(tmp, seed, recipe, info, scores)
    return _train.publish(tmp, out, t0)


def train_student_only(out, seed: int = 0, recipe: dict | None = None, base=WEIGHTS_DIR / FAMILY,
                       evaluate: bool = True, recipe_name: str = "shipped") -> Path:
    """Retrain only the distilled student on ``base``'s VAE (one worker, one thread): the VAE, generator and
    head are copied from ``base`` with their recorded timings; the contrastive recipe's cost is measured
    again on this machine (the same clock as the student's); evaluate; write the manifest; publish to ``out``."""
    from .geneval import check_family_folder
    recipe = recipe or RECIPE
    base = check_family_folder(base, FAMILY, "--base")   # before anything is created
    t0 = time.time()
    out, tmp = _train.fresh_training_dir(out)
    with _train.removed_on_failure(tmp):
        _train_student_into(tmp, t0, seed, recipe, base, evaluate, recipe_name)
    return _train.publish(tmp, out, t0)


def _train_student_into(tmp, t0, seed, recipe, base, evaluate, recipe_name: str = "shipped") -> None:
    base_manifest = json.loads((base / "manifest.json").read_text()) if (base / "manifest.json").is_file() else {}
    info = dict(base_manifest.get("trained_with", {}).get("timings", {}))
    for key in ("vae", "generator", "head"):
        shutil.copy2(base / FILES[key], tmp / FILES[key])
    torch.set_num_threads(recipe["threads_per_worker"])
    teacher = _clips.load_pixel_clip(TEACHER)
    vae = load_vae(tmp / FILES["vae"])
    student, info["student"] = distill(vae, teacher, seed, recipe["student"], probe=zero_shot_probe(vae),
                                       generator=_generator_for(recipe["student"], tmp))
    _ckpt.save(student, tmp / FILES["latent"], dtype="fp16")
    info["contrastive_cost"] = contrastive_cpu_per_step(seed)
    try:
        base_name = str(base.resolve().relative_to(WEIGHTS_DIR.resolve().parent))
    except ValueError:
        base_name = str(base)
    info["student_only"] = {"base": base_name, "seconds": round(time.time() - t0, 1), "load_average_1_5_15_min":
                            [round(x, 2) for x in os.getloadavg()],
                            "note": "VAE, generator and head copied from base (timings theirs); student and "
                                    "contrastive cost measured in this run"}
    scores = evaluate_family(tmp, info=info) if evaluate else None
    write_manifest(tmp, seed, recipe, info, scores,
                   command=f"python -m latentclip.miniworld train --family {FAMILY} --only student --seed {seed} --out DIR"
                           + (f" --student-recipe {recipe_name}" if recipe_name != "shipped" else ""))


DESCRIPTIONS = {
    FILES["vae"]: "mini16 VAE: 64x64x3 images <-> 8x8x16 raw latents (the mini VAE's architecture with 16 latent "
                  "channels); read with latentclip.miniworld.vae.load_vae",
    FILES["generator"]: "mini16 generator: text -> 8x8x16 mini16-VAE latents (the mini generator's recipe); read with "
                        "latentclip.miniworld.generator.load_generator",
    FILES["latent"]: "mini16 Latent-CLIP (VAE family 'mini16') distilled from weights/mini/mini-pixel-clip.safetensors: "
                     "image tower on 16-channel latents, the teacher's text tower frozen; read with latentclip.load",
    FILES["head"]: "head on the mini pixel CLIP's image-embedding space (also the mini16 Latent-CLIP's): "
                   "'no triangle' / 'triangle'; read with latentclip.heads.load_head",
}


def write_manifest(directory, seed: int, recipe: dict, info: dict, scores: dict | None, command: str | None = None) -> Path:
    from .manifest import file_entry, portable
    directory = Path(directory)
    manifest = {
        "family": FAMILY,
        "files": [file_entry(directory / n, w) for n, w in DESCRIPTIONS.items() if (directory / n).is_file()],
        "teacher": {"file": "weights/mini/mini-pixel-clip.safetensors", "sha256": _sha(TEACHER)},
        "trained_with": {"command": command or f"python -m latentclip.miniworld train --family {FAMILY} --seed {seed} --out DIR",
                         "seed": seed, "recipe": recipe, "torch": torch.__version__,
                         "machine": "CPU, 1 torch thread per worker, 2 workers (VAE then generator | student then head)",
                         "timings": info},
        "scores": scores,
    }
    manifest = portable(json.loads(json.dumps(manifest, default=str)), WEIGHTS_DIR.parent)
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _sha(path) -> str:
    from .manifest import sha256
    return sha256(path)


# -- evaluation ----------------------------------------------------------------------------------
#: FK search settings of the comparison (``search.evaluate``'s defaults: 8 particles, 8 steps).
FK_RUNS = ("fk_latent", "fk_pixel")
#: ReNO with the distilled reward at half the iterations of the pixel run (``geneval.RENO``): every ReNO
#: iteration runs the generator forward and backward whatever the reward, which bounds the time ratio of
#: equal-iteration runs from below (see docs/miniworld_mini16.md); this run asks whether the cheaper reward
#: reaches the pixel run's score in half its time.
HALF_RUN = "reno_latent_half"
#: Its settings: 10 iterations with the learning rate tuned for that budget (geneval.RENO's lr 2 was tuned on
#: the 4-channel world and moves the 16-channel generator's noise too little in 10 steps): the best of lr 2-128
#: for the shipped student on GenEval-mini's prompts with seeds 100-111, never the evaluation's seeds (chosen
#: again for each shipped student: lr 32 for the one before the generated rows, lr 48 for this one).
HALF_SETTINGS = {"iterations": 10, "lr": 48.0}
#: The pixel reward's run with its own learning rate tuned the same way (20 iterations, best of lr 2-48 on
#: seeds 100-111), so the half run is also compared with a pixel run that had the same tuning.
PIXEL_TUNED_RUN = "reno_pixel_tuned"
PIXEL_TUNED_SETTINGS = {"lr": 24.0}


def load_world(directory):
    """The mini16 models as a GenEval-mini world: its VAE, generator, distilled reward and the teacher."""
    from .geneval import World, check_family_folder
    d = check_family_folder(directory, FAMILY)
    return World(load_vae(d / FILES["vae"]), _gen.load_generator(d / FILES["generator"]),
                 _ckpt.load(d / FILES["latent"]), _clips.load_pixel_clip(TEACHER))


def reward_seconds(world, n: int = 32, repeats: int = 5) -> dict:
    """Seconds per image of one reward evaluation with its backward pass (what ReNO adds to the
    generator's own cost each iteration): the distilled Latent-CLIP vs decode + pixel teacher."""
    from .geneval import make_reward
    from .generator import noise_for
    prompts = ["a red circle to the left of a blue square"] * n
    with torch.no_grad():
        z = world.generator.sample(noise_for(range(n), channels=world.generator.latent_channels), prompts)
    out = {}
    for kind in ("latent", "pixel", "latent", "pixel"):   # twice, interleaved: the second pass counts
        reward = make_reward(world, kind, prompts)
        t = time.perf_counter()
        for _ in range(repeats):
            x = z.clone().requires_grad_(True)
            reward.loss(x).sum().backward()
        out[kind] = (time.perf_counter() - t) / (repeats * n)
    out["ratio"] = out["latent"] / out["pixel"]
    return out


def _mean4(accs: dict) -> float:
    return float(np.mean([accs[t] for t in ("shape", "color", "count", "retrieval")]))


def time_to_mean(trajectory, target: float, contrastive_cpu: float | None) -> dict:
    """From a run's recorded trajectory (``distill``'s probe on the held-out zero-shot sets): the training
    CPU seconds at the first point whose mean of shape, colour, count and retrieval reaches ``target``
    (None if none did), and that time over the contrastive recipe's CPU seconds."""
    if not trajectory:
        return {}
    hit = next((p for p in trajectory if p["mean_shape_color_count_retrieval"] >= target - 1e-9), None)
    out = {"student_trajectory": [{k: p[k] for k in ("step", "train_cpu_seconds", "relation",
                                                     "mean_shape_color_count_retrieval")} for p in trajectory],
           "student_cpu_seconds_to_contrastive_mean": hit["train_cpu_seconds"] if hit else None,
           "student_steps_to_contrastive_mean": hit["step"] if hit else None}
    if hit and contrastive_cpu:
        out["cpu_ratio_to_contrastive_mean"] = hit["train_cpu_seconds"] / contrastive_cpu
    return out


#: The fast student's recorded run (``train --family mini16 --only student --student-recipe fast``'s manifest),
#: kept beside the shipped files: its student is not shipped, its held-out scores and CPU are the compute comparison.
FAST_RUN = "fast-student-run.json"


def fast_run_summary(record: dict) -> dict:
    """The compute comparison from a fast-student run's manifest: its training CPU against the contrastive
    recipe's, measured in the same run, and its held-out zero-shot mean against the contrastive model's."""
    d = record["scores"]["distill"]
    out = {k: d.get(k) for k in ("student_cpu_seconds", "contrastive_cpu_seconds", "cpu_ratio", "student_zero_shot_mean",
                                 "contrastive_zero_shot_mean", "student_steps", "student_cpu_seconds_to_contrastive_mean",
                                 "cpu_ratio_to_contrastive_mean", "student_trajectory")}
    out["relation"] = record["scores"]["zero_shot"]["latent"]["relation"]
    out["target_correction"] = record["trained_with"].get("timings", {}).get("student", {}).get("target_correction")
    out["reached"] = bool(out["cpu_ratio_to_contrastive_mean"] is not None and out["cpu_ratio_to_contrastive_mean"] <= 0.2)
    out["command"] = record["trained_with"]["command"]
    return out


def evaluate_family(directory="weights/mini16", prompts: list[str] | None = None, n: int = 400, per_prompt: int = 8,
                    geneval_prompts=None, geneval_seeds=None, generation: bool = True, info: dict | None = None,
                    head_n: int = 1000, log=log) -> dict:
    """The scores ``eval --family mini16`` writes: zero_shot, geneval, distill, heads (issue 23's keys)."""
    from . import eval as E
    from . import geneval as G
    from ..heads import load_head
    d = Path(directory)
    if info is None:
        manifest = d / "manifest.json"
        info = json.loads(manifest.read_text())["trained_with"]["timings"] if manifest.is_file() else {}
    world = load_world(d)
    sets, ret = E.task_sets(n), E.retrieval_set(prompts, per_prompt)
    zs = {"pixel": E.zero_shot("pixel", world.pixel_clip, world.vae, sets, ret),
          "latent": E.zero_shot("latent", world.latent_clip, world.vae, sets, ret)}
    for accs in zs.values():
        accs["mean_shape_color_count_retrieval"] = _mean4(accs)
    log(f"zero-shot: pixel {zs['pixel']}, latent {zs['latent']}")
    result = {"family": FAMILY, "zero_shot": zs}
    contrastive = json.loads((CONTRASTIVE_DIR / "manifest.json").read_text())
    cost = info.get("contrastive_cost", {})
    student = info.get("student", {})
    result["distill"] = {
        "student_cpu_seconds": student.get("train_cpu_seconds"),
        "contrastive_cpu_seconds": cost.get("cpu_seconds"),
        "student_zero_shot_mean": zs["latent"]["mean_shape_color_count_retrieval"],
        "contrastive_zero_shot_mean": contrastive["scores"]["zero_shot"]["latent"]["mean_shape_color_count_retrieval"],
        "student_steps": student.get("steps"),
        "student_pre_encoding_cpu_seconds": student.get("pre_encoding", {}).get("cpu_seconds"),
        "contrastive_recorded_wall_seconds": contrastive["trained_with"]["timings"]["latent"]["seconds"],
        "contrastive_cpu_seconds_per_step": cost.get("cpu_seconds_per_step"),
        "how": "student: process CPU time of its training steps (one torch thread); contrastive: the shipped "
               "4-channel recipe (train.train_clip, 2250 steps) timed the same way on the same machine for "
               f"{cost.get('steps_measured')} steps, times 2250; its recorded wall time (idle cores) is beside it",
    }
    if student.get("train_cpu_seconds") and cost.get("cpu_seconds"):
        result["distill"]["cpu_ratio"] = student["train_cpu_seconds"] / cost["cpu_seconds"]
    result["distill"].update(time_to_mean(student.get("trajectory"), result["distill"]["contrastive_zero_shot_mean"],
                                          cost.get("cpu_seconds")))
    if (d / FAST_RUN).is_file():
        result["distill"]["fast_recipe"] = fast_run_summary(json.loads((d / FAST_RUN).read_text()))
    result["heads"] = head_transfer(load_head(d / FILES["head"]), world.pixel_clip, world.vae, world.latent_clip, head_n)
    log(f"heads: {result['heads']}")
    result["settings"] = {"images_per_task": n, "retrieval_captions": len(ret["captions"]), "seed": E.EVAL_SEED,
                          "threads": torch.get_num_threads()}
    if generation:
        seeds = tuple(geneval_seeds or G.SEEDS)
        pairs = geneval_prompts or G.default_prompts()
        parts = [generation_scores(world, pairs, seeds, runs, log) for runs in (G.RUNS, FK_RUNS)]
        result["geneval"] = {k: v for part in parts for k, v in part.items() if k != "settings"}
        result["settings"].update({k: v for part in parts for k, v in part["settings"].items()})
        result["geneval"][HALF_RUN] = G.evaluate(world, pairs, seeds=seeds, runs=("reno_latent",),
                                                 settings=HALF_SETTINGS, log=log)["reno_latent"]
        result["geneval"][PIXEL_TUNED_RUN] = G.evaluate(world, pairs, seeds=seeds, runs=("reno_pixel",),
                                                        settings=PIXEL_TUNED_SETTINGS, log=log)["reno_pixel"]
        result["settings"][HALF_RUN] = {**G.RENO, **HALF_SETTINGS}
        result["settings"][PIXEL_TUNED_RUN] = {**G.RENO, **PIXEL_TUNED_SETTINGS}
        result["reward_seconds_per_image"] = reward_seconds(world)
        for method in ("reno", "fk"):
            result["geneval"][f"{method}_interleaved_seconds_per_image"] = seconds_interleaved(world, pairs, method, seeds)
        compare_rewards(result["geneval"])
    return result


def generation_scores(world, pairs, seeds, runs, log=log) -> dict:
    """GenEval-mini of ``runs`` on the mini16 generator: ReNO runs (``geneval.RUNS``) or FK runs (``FK_RUNS``)."""
    from . import geneval as G
    from . import search as MS
    if set(runs) <= set(G.RUNS):
        out = G.evaluate(world, pairs, seeds=seeds, runs=runs, log=log)
        out["settings"] = {"geneval": out["settings"]}
        return out
    out = MS.evaluate(world, pairs, seeds, runs=runs, log=log)
    out["settings"] = {"fk": {"particles": 8, "steps": MS.STEPS, "eta": MS.ETA, **MS.FK}}
    return out


def seconds_interleaved(world, pairs, method: str, seeds=(0,), items: int = 16, rounds: int = 2) -> dict:
    """Seconds per image of the latent and the pixel reward's runs of ``method`` ("reno" or "fk"), timed
    alternately on the same items: on a shared machine, runs timed at different moments see different
    loads (the FK evaluation runs one run after the other). The last round counts."""
    from . import geneval as G
    from . import search as MS
    from .generator import noise_for
    chosen = [(p, int(sd)) for _, p in pairs for sd in seeds][:items]
    prompts, sds = [p for p, _ in chosen], [sd for _, sd in chosen]
    out = {}
    for _ in range(rounds):
        for kind in ("latent", "pixel"):
            t = time.perf_counter()
            if method == "fk":
                MS.run_batch(world, f"fk_{kind}", prompts, sds, 8)
            else:
                G.reno_latents(world, kind, prompts, noise_for(sds, channels=world.generator.latent_channels))
            out[f"{method}_{kind}"] = (time.perf_counter() - t) / len(chosen)
        if method == "reno":
            t = time.perf_counter()
            G.reno_latents(world, "latent", prompts, noise_for(sds, channels=world.generator.latent_channels),
                           HALF_SETTINGS)
            out[HALF_RUN] = (time.perf_counter() - t) / len(chosen)
    return {**out, "items": len(chosen)}


def compare_rewards(geneval: dict) -> dict:
    """Adds ``reno_latent_vs_pixel``, ``fk_latent_vs_pixel`` and (when run) ``reno_latent_half_vs_pixel`` and
    ``reno_latent_half_vs_pixel_tuned``:
    points and time ratio of the distilled reward's run against the pixel run (from ``seconds_interleaved``
    when present as ``<method>_interleaved_seconds_per_image``)."""
    pairs = [("reno", "reno_latent"), ("fk", "fk_latent")] + ([("reno", HALF_RUN)] if HALF_RUN in geneval else [])
    for method, run in pairs:
        lat, pix = geneval[run], geneval[f"{method}_pixel"]
        inter = geneval.get(f"{method}_interleaved_seconds_per_image")
        ratio = (inter[run] / inter[f"{method}_pixel"]) if inter and run in inter \
            else lat["seconds_per_image"] / pix["seconds_per_image"]
        geneval[f"{run}_vs_pixel"] = {"overall_points": 100 * (lat["overall"] - pix["overall"]), "time_ratio": ratio}
    if HALF_RUN in geneval and PIXEL_TUNED_RUN in geneval:
        # the tuned pixel run costs what the shipped one does (same iterations; the lr costs nothing)
        geneval[f"{HALF_RUN}_vs_pixel_tuned"] = {
            "overall_points": 100 * (geneval[HALF_RUN]["overall"] - geneval[PIXEL_TUNED_RUN]["overall"]),
            "time_ratio": geneval[f"{HALF_RUN}_vs_pixel"]["time_ratio"]}
    return geneval


def format_table(r: dict) -> str:
    from .eval import TASKS
    zs = r["zero_shot"]
    lines = ["zero-shot accuracy (%), mini16", f"{'task':<12}{'teacher (pixel)':>16}{'student (latent)':>18}"]
    for t in (*TASKS, "mean_shape_color_count_retrieval"):
        lines.append(f"{'mean(s,c,n,r)' if t.startswith('mean') else t:<12}{100 * zs['pixel'][t]:>16.1f}"
                     f"{100 * zs['latent'][t]:>18.1f}")
    dd = r["distill"]
    lines += ["", f"distillation: student {dd['student_cpu_seconds']} s CPU, contrastive {dd['contrastive_cpu_seconds']} s "
              f"CPU; zero-shot mean student {100 * dd['student_zero_shot_mean']:.1f} vs contrastive "
              f"{100 * dd['contrastive_zero_shot_mean']:.1f}"]
    if dd.get("fast_recipe"):
        f = dd["fast_recipe"]
        lines.append(f"fast recipe ({f['student_steps']} steps): {f['student_cpu_seconds']} s CPU ({f['cpu_ratio']:.2f}x the "
                     f"contrastive {f['contrastive_cpu_seconds']} s), zero-shot mean {100 * f['student_zero_shot_mean']:.2f} vs "
                     f"{100 * f['contrastive_zero_shot_mean']:.2f}; reached within 1/5: {'yes' if f['reached'] else 'no'}")
    h = r["heads"]
    lines.append(f"head transfer: teacher {100 * h['teacher_accuracy']:.1f}%, student {100 * h['student_accuracy']:.1f}% "
                 f"({100 * h['ratio']:.1f}% of the teacher's)")
    if "geneval" in r:
        g = r["geneval"]
        lines += ["", f"{'GenEval-mini':<18}{'overall %':>10}{'s/image':>10}"]
        for run in ("baseline", "reno_latent", "reno_pixel", *FK_RUNS, HALF_RUN, PIXEL_TUNED_RUN):
            if run not in g:
                continue
            lines.append(f"{run:<18}{100 * g[run]['overall']:>10.1f}{g[run]['seconds_per_image']:>10.4f}")
    return "\n".join(lines)
