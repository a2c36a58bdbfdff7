"""Try a mini16 student recipe and score it on a VALIDATION split, never on the evaluation sets.

    python tools/mini16_recipe_search.py --name NAME --recipe '{"steps": 1000, "pool": 24000, ...}' \
        [--weights weights/mini16] [--cache DIR] [--log runs.jsonl] [--save FILE] [--held-out] [--retrieval-draws N]
    python tools/mini16_recipe_search.py --score FILE [--retrieval-draws N]
    python tools/mini16_recipe_search.py --text-order

Distils ``mini16.distill`` with the recipe overrides (seed 0, one torch thread) on the VAE and teacher of
``--weights``, then scores the student's zero-shot tasks on scenes drawn from ``VALIDATION_SEED``
(``eval.EVAL_SEED`` and the training streams use other seeds) and a retrieval set of 48 captions whose 12
relation captions are drawn with another seed than the evaluation's. Picking a recipe here and reporting
it once on ``eval --family mini16`` keeps the reported numbers held out (``--held-out`` adds those
sets' scores, for reporting a run chosen on validation). Prints one JSON line (also
appended to ``--log``): the recipe, the training steps' CPU seconds, the final losses, the accuracies.

``--cache DIR`` keeps the pre-encoded pool (latents, teacher embeddings, captions) in safetensors and
JSON files, so runs that differ only in the recipe's loss terms skip the pre-encoding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentclip.miniworld import eval as E          # noqa: E402
from latentclip.miniworld import mini16 as M        # noqa: E402
from latentclip.miniworld import scenes as S        # noqa: E402

VALIDATION_SEED = 5_500_007
VALIDATION_RETRIEVAL_DRAW = 12      # the evaluation draws its 12 relation captions with seed 11


def load_pool(world, seed: int, size: int, cache: Path | None):
    """(latents, captions, truesets) and the teacher targets of the pool, from ``cache`` when there."""
    from safetensors.torch import load_file, save_file
    files = (cache / f"pool-{seed}-{size}.safetensors", cache / f"pool-{seed}-{size}.json") if cache else None
    if files and files[0].is_file() and files[1].is_file():
        t, meta = load_file(files[0]), json.loads(files[1].read_text())
        return (t["latents"], meta["captions"], [set(x) for x in meta["truesets"]]), (t["targets"], 0.0)
    pool = M.encoded_pool(world.vae, seed, size)
    targets = M.teacher_targets(world.pixel_clip, seed, size)
    if files:
        cache.mkdir(parents=True, exist_ok=True)
        save_file({"latents": pool[0].contiguous(), "targets": targets[0].contiguous()}, files[0])
        files[1].write_text(json.dumps({"captions": pool[1], "truesets": [sorted(x) for x in pool[2]]}))
    return pool, targets


AXIS = {"to the left of": "horizontal", "to the right of": "horizontal", "above": "vertical", "below": "vertical"}


def _picks(img, txt, rows) -> list[str]:
    """For each image feature, the caption of its row that scores highest."""
    return [row[int(torch.stack([txt[c] for c in row]).matmul(f).argmax())] for f, row in zip(img, rows)]


def relation_axis_accuracy(student, img, relation_set: dict) -> float:
    """How often the chosen relation lies on the true axis (left/right vs above/below): the relation
    task's easy half. Relation accuracy well above this half's chance but near 50% means the axis is
    learnt and the order (which object is left) is not. ``img``: the student's features of the set's images."""
    rows = relation_set["labels"]
    picks = _picks(img, E._text(student, [c for row in rows for c in row]), rows)
    return float(np.mean([AXIS[S.parse(p).relation] == AXIS[S.parse(row[t]).relation]
                          for p, row, t in zip(picks, rows, relation_set["target"])]))


def relation_both_orders_accuracy(student, img, relation_set: dict) -> float:
    """The relation task over all eight wordings of a scene's pair (both word orders, four relations each):
    right when the chosen caption is true. Retrieval meets this when two of its captions name one pair."""
    rows = [[M.relation_caption(S.parse(row[0]), r, swapped) for swapped in (False, True) for r in S.RELATIONS]
            for row in relation_set["labels"]]
    picks = _picks(img, E._text(student, [c for row in rows for c in row]), rows)
    return float(np.mean([S.holds(sc, S.parse(p)) for sc, p in zip(relation_set["scenes"], picks)]))


def validation_scores(student, vae, n: int = 400) -> dict:
    sets = E.task_sets(n, seed=VALIDATION_SEED)
    ret = E.retrieval_set(E.default_retrieval_captions(seed=VALIDATION_RETRIEVAL_DRAW), 8, seed=VALIDATION_SEED + 1)
    acc = {k: round(100 * v, 2) for k, v in E.zero_shot("latent", student, vae, sets, ret).items()}
    acc["mean_shape_color_count_retrieval"] = round(M._mean4(acc), 2)
    img = E._features("latent", student, vae, sets["relation"]["images"])
    acc["relation_axis"] = round(100 * relation_axis_accuracy(student, img, sets["relation"]), 2)
    acc["relation_both_orders"] = round(100 * relation_both_orders_accuracy(student, img, sets["relation"]), 2)
    return acc


def retrieval_over_draws(model, vae, draws: int, kind: str = "latent") -> dict:
    """Retrieval over ``draws`` validation draws of the 12 relation captions (draw seeds from
    ``VALIDATION_RETRIEVAL_DRAW`` on, never the evaluation's 11), 8 images a caption each. One draw
    holds a pair of captions only word order tells apart (the same two objects, e.g. "A below B" and
    "A above B") or it does not, so one draw's retrieval swings with the draw; the mean over many is
    what a recipe choice can rely on."""
    accs = []
    for d in range(VALIDATION_RETRIEVAL_DRAW, VALIDATION_RETRIEVAL_DRAW + draws):
        caps = E.default_retrieval_captions(seed=d)
        ret = E.retrieval_set(caps, 8, seed=VALIDATION_SEED + 1 + d)
        accs.append(100 * E.zero_shot(kind, model, vae, {}, ret)["retrieval"])
    a = np.array(accs)
    return {"draws": draws, "mean": round(float(a.mean()), 2), "min": round(float(a.min()), 2),
            "below_99": int((a < 99).sum())}


def held_out_scores(student, vae, n: int = 400) -> dict:
    """The student's zero-shot scores on the sets ``eval --family mini16`` reports (``mini16.zero_shot_probe``)."""
    acc = M.zero_shot_probe(vae, n)(student)
    return {k: round(100 * v, 2) for k, v in acc.items()}


def text_order_consistency(model) -> dict:
    """Whether a CLIP's text tower agrees with itself on word order. For each ordered pair of objects A, B:
    v1 = t("A left of B") - t("A right of B") and v2 = t("B right of A") - t("B left of A") are the
    directions an image of A left of B must lean along to be scored right under either wording. Their
    cosine: near +1 when the tower reads order (both wordings agree), negative when it mostly reads the
    relation word alone (the two wordings pull the image apart)."""
    text = M.teacher_text_embeddings(model, S.all_captions())
    objs = [(c, s) for c in S.COLORS for s in S.SHAPES]
    cos = []
    for a in objs:
        for b in objs:
            if a != b:
                pair = S.Spec("relation", a[0], a[1], 2, None, b[0], b[1])
                t = {(r, sw): text[M.relation_caption(pair, r, sw)] for r in ("to the left of", "to the right of")
                     for sw in (False, True)}
                v1 = t["to the left of", False] - t["to the right of", False]
                v2 = t["to the right of", True] - t["to the left of", True]
                cos.append(float(torch.nn.functional.cosine_similarity(v1, v2, dim=0)))
    return {"mean_cosine": round(float(np.mean(cos)), 3), "share_below_zero": round(float(np.mean(np.array(cos) < 0)), 3),
            "pairs": len(cos)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="a name for the run (required unless --text-order)")
    p.add_argument("--text-order", action="store_true",
                   help="print text_order_consistency of the teacher and of the 4-channel contrastive Latent-CLIP, and stop")
    p.add_argument("--recipe", default="{}", help="JSON overrides of mini16.RECIPE['student']")
    p.add_argument("--weights", default=str(ROOT / "weights" / "mini16"))
    p.add_argument("--cache", default=None, help="folder for the pre-encoded pool")
    p.add_argument("--log", default=None, help="JSONL file to append the result to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the student here (fp16 safetensors, latentclip.load reads it)")
    p.add_argument("--retrieval-draws", type=int, default=0,
                   help="also score retrieval over this many validation draws of the relation captions (mean, min)")
    p.add_argument("--score", default=None, metavar="FILE",
                   help="train nothing: score this Latent-CLIP file (mini16 student, or the 4-channel contrastive "
                        "model's weights/mini/mini-latent-clip.safetensors on its own VAE) on the validation split")
    p.add_argument("--held-out", action="store_true",
                   help="also score on eval --family mini16's held-out zero-shot sets: for reporting a recipe once "
                        "it has been chosen on validation, never for choosing it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.text_order:
        from latentclip.miniworld.clips import load_latent_clip, load_pixel_clip
        print(json.dumps({"teacher": text_order_consistency(load_pixel_clip(M.TEACHER)),
                          "contrastive_4ch": text_order_consistency(
                              load_latent_clip(M.CONTRASTIVE_DIR / "mini-latent-clip.safetensors"))}))
        return 0
    if args.score:
        from latentclip import checkpoints
        from latentclip.miniworld.vae import load_vae
        model = checkpoints.load(args.score)   # only the VAE its latents come from is needed besides it
        vae = load_vae(Path(args.weights) / M.FILES["vae"] if model.vae_family == M.FAMILY
                       else M.CONTRASTIVE_DIR / "mini-vae.safetensors")
        out = {"score": Path(args.score).name, "validation": validation_scores(model, vae)}
        if args.retrieval_draws:
            out["validation"]["retrieval_draws"] = retrieval_over_draws(model, vae, args.retrieval_draws)
        print(json.dumps(out))
        return 0
    if not args.name:
        p.error("--name is required for a run")
    overrides = json.loads(args.recipe)
    recipe = {**M.RECIPE["student"], **overrides}
    world = M.load_world(args.weights)
    pool, targets = load_pool(world, args.seed, recipe["pool"], Path(args.cache) if args.cache else None)
    student, info = M.distill(world.vae, world.pixel_clip, args.seed, recipe, progress_every=100, targets=targets, pool=pool,
                              generator=world.generator)
    if args.save:
        from latentclip import checkpoints
        checkpoints.save(student, args.save, dtype="fp16")
    out = {"name": args.name, "recipe": overrides, "train_cpu_seconds": info["train_cpu_seconds"],
           "final_losses": info["final_losses"], "validation": validation_scores(student, world.vae)}
    if args.retrieval_draws:
        out["validation"]["retrieval_draws"] = retrieval_over_draws(student, world.vae, args.retrieval_draws)
    if args.held_out:
        out["held_out"] = held_out_scores(student, world.vae)
    line = json.dumps(out)
    print(line)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
