"""The shipped mini16 family (weights/mini16): a 16-channel mini VAE, its generator, a Latent-CLIP
distilled from the mini pixel CLIP, and a head on that CLIP's embedding space."""
import json

import numpy as np
import pytest
import torch

import latentclip
from latentclip.configs import WEIGHTS_DIR
from latentclip.heads import load_head
from latentclip.miniworld import eval as E
from latentclip.miniworld import mini16 as M
from latentclip.miniworld import scenes as S
from latentclip.miniworld.clips import load_pixel_clip
from latentclip.miniworld.generator import load_generator, noise_for
from latentclip.miniworld.manifest import content_sha256, sha256
from latentclip.miniworld.vae import images_to_tensor, load_vae

torch.set_num_threads(1)
DIR = WEIGHTS_DIR / "mini16"
#: Small distillations that are about another part of the recipe skip the generated rows (their pool samples the generator).
NO_GENERATED = {"generated_prompts": 0}


@pytest.fixture(scope="module")
def world():
    return M.load_world(DIR)


def test_manifest_matches_the_files_and_stays_small():
    manifest = json.loads((DIR / "manifest.json").read_text())
    assert {f["file"] for f in manifest["files"]} == set(M.FILES.values())
    for f in manifest["files"]:
        assert sha256(DIR / f["file"]) == f["sha256"] and content_sha256(DIR / f["file"]) == f["content_sha256"]
    assert sum((DIR / f["file"]).stat().st_size for f in manifest["files"]) <= 20 * 2**20
    assert manifest["teacher"]["sha256"] == sha256(M.TEACHER)
    assert "--family mini16" in manifest["trained_with"]["command"]
    assert not _absolute_paths(manifest), "the manifest names paths of the machine that trained it"


def _absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_files_are_16_channel_and_load_through_the_public_loaders(world):
    assert world.vae.latent_channels == 16 and world.generator.latent_channels == 16
    student = latentclip.load(DIR / M.FILES["latent"])
    assert student.vae_family == "mini16" and student.latent_channels == 16 and student.latent_size == 8
    x = images_to_tensor(S.make_batch(5, 4).images)
    with torch.no_grad():
        z = world.vae.encode(x)
        assert z.shape == (4, 16, 8, 8) and world.vae.decode(z).shape == (4, 3, 64, 64)
        assert world.generator.sample(noise_for([0, 1], channels=16), "a red circle").shape == (2, 16, 8, 8)
    with pytest.raises(latentclip.InputError, match="4 channels but this Latent-CLIP reads 16-channel MINI16"):
        student.encode_latents(torch.zeros(1, 4, 8, 8))


def test_the_text_tower_is_the_teachers():
    student = latentclip.load(DIR / M.FILES["latent"])
    teacher = load_pixel_clip(M.TEACHER)
    texts = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle"]
    with torch.no_grad():
        assert torch.allclose(student.encode_text(texts), teacher.encode_text(texts), atol=1e-5)


def test_a_small_zero_shot_subset_beats_chance_and_the_head_transfers(world):
    sets = {k: v for k, v in E.task_sets(24, seed=321).items() if k in ("shape", "color", "count")}
    ret = E.retrieval_set(["a red circle", "a blue square", "two green triangles", "a yellow object"], 3, seed=9)
    acc = E.zero_shot("latent", world.latent_clip, world.vae, sets, ret)
    assert acc["color"] >= 0.8 and acc["shape"] >= 0.8 and acc["count"] >= 0.8, acc  # chance 0.25, 0.33, 0.33
    assert acc["retrieval"] >= 0.75, acc
    h = M.head_transfer(load_head(DIR / M.FILES["head"]), world.pixel_clip, world.vae, world.latent_clip, n=64, seed=1)
    assert h["teacher_accuracy"] >= 0.85 and h["student_accuracy"] >= 0.85, h


def test_distillation_is_deterministic_per_seed(world):
    recipe = {**NO_GENERATED, "pool": 96, "steps": 2, "batch": 32}
    runs = [M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=10)[0] for _ in range(2)]
    a, b = (r.clip.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [k for k in a if k.startswith("visual.") and not torch.equal(a[k], M.build_student(world.pixel_clip).clip.state_dict()[k])]
    assert "visual.conv1.weight" in changed
    assert all(torch.equal(a[k], world.pixel_clip.clip.state_dict()[k]) for k in a if k.startswith("transformer."))


def test_eval_cli_family_mini16_writes_the_issue_keys(tmp_path):
    from latentclip.miniworld.__main__ import main
    out = tmp_path / "s.json"
    assert main(["eval", "--family", "mini16", "--json", str(out), "--n", "8", "--per-prompt", "1", "--head-n", "32",
                 "--threads", "1", "--no-generation"]) == 0
    r = json.loads(out.read_text())
    for kind in ("pixel", "latent"):
        assert set(E.TASKS) <= set(r["zero_shot"][kind])
    assert {"student_cpu_seconds", "contrastive_cpu_seconds", "student_zero_shot_mean",
            "contrastive_zero_shot_mean"} <= set(r["distill"])
    assert r["distill"]["student_cpu_seconds"] > 0 and r["distill"]["contrastive_cpu_seconds"] > 0
    fast = r["distill"]["fast_recipe"]     # the compute comparison's recorded run (weights/mini16/fast-student-run.json)
    assert fast["student_steps"] == M.FAST_STUDENT["steps"] and fast["cpu_ratio"] > 0 and isinstance(fast["reached"], bool)
    assert {"teacher_accuracy", "student_accuracy"} <= set(r["heads"])


def test_hard_negative_choice_is_about_the_hard_negatives_only():
    from latentclip.distill_loss import hard_negative_choice
    torch.manual_seed(0)
    true, neg = torch.randn(3, 8), torch.randn(3, 8)
    opts = torch.stack([true, neg], 1)
    img = true.clone()
    low = hard_negative_choice(img, opts, 100.0)
    assert float(low) < 1e-3                                      # the image is its true caption
    far = hard_negative_choice(neg, opts, 100.0)
    assert float(far) > 5.0                                       # the image is the hard negative
    masked = hard_negative_choice(neg, opts, 100.0, torch.tensor([[True, False]] * 3))
    assert float(masked) == pytest.approx(0.0, abs=1e-6)          # a missing column never competes
    with pytest.raises(ValueError):
        hard_negative_choice(img, true, 100.0)


def test_hard_negative_margin_stops_pulling_once_the_true_caption_leads_by_the_margin():
    from latentclip.distill_loss import hard_negative_margin
    true = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    neg = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0]]), dim=-1)
    opts = torch.stack([true, neg], 1)
    near = torch.tensor([[1.0, 0.02, 0.0]], requires_grad=True)   # leads the negative by less than the margin
    loss = hard_negative_margin(near, opts, 0.01)
    assert float(loss.detach()) > 0
    loss.backward()
    assert float(near.grad[0, 1]) > 0                             # pushed away from the negative
    ahead = torch.tensor([[1.0, -0.3, 0.0]], requires_grad=True)  # already far ahead: no pull at all
    hard_negative_margin(ahead, opts, 0.01).backward()
    assert float(ahead.grad.abs().max()) == 0.0
    masked = hard_negative_margin(neg, opts, 0.01, torch.tensor([[True, False]]))
    assert float(masked) == 0.0                                   # a missing column never counts
    with pytest.raises(ValueError):
        hard_negative_margin(near, true, 0.01)


def test_relation_choices_swap_the_relation_word_and_never_offer_a_true_caption():
    batch = S.make_batch(123, 40, "relation")
    truesets = [set(S.true_captions(s)) for s in batch.scenes]
    rows, options = M._relation_choices(list(range(40)), truesets)
    assert len(rows) >= 40
    for pos, opts in zip(rows, options):
        first = S.parse(opts[0])
        assert opts[0] in truesets[pos] and not any(o in truesets[pos] for o in opts[1:])
        for o in opts[1:]:
            spec = S.parse(o)
            assert (spec.color, spec.shape, spec.color2, spec.shape2) == (first.color, first.shape, first.color2, first.shape2)
            assert spec.relation != first.relation
    rows2, options2 = M._relation_choices(list(range(40)), truesets, both_orders=True)
    assert rows2 == rows
    for pos, short, both in zip(rows2, options, options2):
        extra = both[len(short):]
        first = S.parse(both[0])
        assert both[:len(short)] == short and len(extra) == 3        # the other word order, its three false relations
        assert all((S.parse(o).color, S.parse(o).shape) == (first.color2, first.shape2) for o in extra)
        assert not any(o in truesets[pos] for o in extra)


def test_the_relation_term_moves_relation_scenes_toward_their_true_caption(world):
    """A few steps with only the hard-negative relation term lower it on the training batch."""
    recipe = {**NO_GENERATED, "pool": 64, "steps": 6, "batch": 64, "lr": 1e-3, "warmup": 1, "contrastive_weight": 0.0,
              "relation_weight": 1.0, "relation_logit_scale": 100.0}
    _, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    assert "relation" in info["final_losses"] and info["recipe"]["relation_weight"] == 1.0


def test_a_pool_encoded_beforehand_trains_the_same_student(world):
    """``distill(pool=..., targets=...)`` (a recipe search reuses one pre-encoded pool) equals a plain run."""
    recipe = {**NO_GENERATED, "pool": 64, "steps": 3, "batch": 32, "relation_weight": 0.3, "relation_logit_scale": 1000.0}
    plain, _ = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    reused, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100,
                             targets=M.teacher_targets(world.pixel_clip, 0, 64), pool=M.encoded_pool(world.vae, 0, 64))
    for (name, a), b in zip(plain.clip.state_dict().items(), reused.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert "relation" in info["final_losses"]


def test_a_probe_records_the_trajectory_and_leaves_training_alone(world):
    """Probing every step (held-out zero-shot scores, off the training clock) trains the same student."""
    recipe = {**NO_GENERATED, "pool": 64, "steps": 3, "batch": 32, "trajectory_every": 2}
    plain, _ = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    calls = []

    def probe(student):
        calls.append(student.training)
        return {"mean_shape_color_count_retrieval": 0.5 * len(calls), "relation": 0.25}
    probed, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100, probe=probe)
    for (name, a), b in zip(plain.clip.state_dict().items(), probed.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert calls == [False, False]                                       # steps 2 and 3 (the end), in eval mode
    assert [p["step"] for p in info["trajectory"]] == [2, 3]
    assert info["trajectory"][0]["train_cpu_seconds"] <= info["trajectory"][1]["train_cpu_seconds"] <= info["train_cpu_seconds"]
    reached = M.time_to_mean(info["trajectory"], 1.0, 10.0)
    assert reached["student_steps_to_contrastive_mean"] == 3
    assert reached["cpu_ratio_to_contrastive_mean"] == pytest.approx(info["trajectory"][1]["train_cpu_seconds"] / 10.0)
    assert M.time_to_mean(info["trajectory"], 2.0, 10.0)["student_cpu_seconds_to_contrastive_mean"] is None


def test_the_symmetric_relation_loss_prefers_an_image_that_agrees_with_both_word_orders(world):
    text = M.teacher_text_embeddings(world.pixel_clip, S.all_captions())
    batch = S.make_batch(7, 12, "relation")
    truesets = [set(S.true_captions(s)) for s in batch.scenes]
    right = torch.stack([sum(text[c] for c in sorted(t)) for t in truesets])
    wrong = []
    for t in truesets:
        spec = S.parse(sorted(t)[0])
        swap = S.Spec("relation", spec.color, spec.shape, 2, M._INVERSE[spec.relation], spec.color2, spec.shape2)
        wrong.append(text[S.caption(swap)] + text[S.caption(S.Spec("relation", spec.color2, spec.shape2, 2,
                                                                    spec.relation, spec.color, spec.shape))])
    idx = list(range(12))
    assert float(M.symmetric_relation_loss(right, idx, truesets, text, 1000.0)) < \
        float(M.symmetric_relation_loss(torch.stack(wrong), idx, truesets, text, 1000.0))
    assert M.symmetric_relation_loss(right, idx, [set()] * 12, text, 1000.0) is None


def test_only_student_copies_the_rest_and_writes_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "contrastive_cpu_per_step", lambda seed=0: {"cpu_seconds_per_step": 0.5, "steps_measured": 1,
                                                                      "recipe_steps": 2250, "cpu_seconds": 1125.0})
    recipe = {**M.RECIPE, "student": {**M.RECIPE["student"], "pool": 64, "steps": 2, "batch": 32, "generated_prompts": 3}}
    out = M.train_student_only(tmp_path / "out", 0, recipe, evaluate=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["file"] for f in manifest["files"]} == set(M.FILES.values())
    for key in ("vae", "generator", "head"):
        assert sha256(out / M.FILES[key]) == sha256(DIR / M.FILES[key])
    assert "--only student" in manifest["trained_with"]["command"]
    assert manifest["trained_with"]["timings"]["student"]["steps"] == 2
    end = manifest["trained_with"]["timings"]["student"]["trajectory"][-1]    # held-out scores recorded at the end
    assert end["step"] == 2 and set(E.TASKS) <= set(end)
    assert manifest["trained_with"]["timings"]["contrastive_cost"]["cpu_seconds"] == 1125.0
    assert manifest["trained_with"]["recipe"]["vae"]["init_from"] == "weights/mini/mini-vae.safetensors"
    pre = manifest["trained_with"]["timings"]["student"]["pre_encoding"]
    assert 0 < pre["teacher_cpu_seconds"] <= pre["cpu_seconds"]
    assert pre["generated_cpu_seconds"] > 0            # the copied generator sampled the generated rows
    assert not _absolute_paths(manifest["trained_with"]["recipe"])


def test_the_recipe_is_the_shipped_students():
    """RECIPE['student'] is the recipe the shipped student's manifest records (train --only student reads it)."""
    manifest = json.loads((DIR / "manifest.json").read_text())
    assert manifest["trained_with"]["recipe"]["student"] == M.RECIPE["student"]


def test_a_zero_relation_weight_adds_no_relation_term(world):
    recipe = {**NO_GENERATED, "pool": 64, "steps": 2, "batch": 32, "relation_weight": 0.0, "relation_logit_scale": 1000.0}
    _, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    assert "relation" not in info["final_losses"]


def test_the_half_run_halves_the_iterations_and_is_compared_with_both_pixel_runs():
    from latentclip.miniworld import geneval as G
    assert M.HALF_SETTINGS["iterations"] == G.RENO["iterations"] // 2
    assert M.PIXEL_TUNED_SETTINGS.get("iterations", G.RENO["iterations"]) == G.RENO["iterations"]
    run = lambda overall, sec: {"overall": overall, "seconds_per_image": sec}
    g = {"reno_latent": run(0.20, 0.2), "reno_pixel": run(0.23, 0.3), "fk_latent": run(0.25, 0.1),
         "fk_pixel": run(0.27, 0.25), M.HALF_RUN: run(0.25, 0.1), M.PIXEL_TUNED_RUN: run(0.27, 0.3),
         "reno_interleaved_seconds_per_image": {"reno_latent": 0.2, "reno_pixel": 0.4, M.HALF_RUN: 0.12}}
    M.compare_rewards(g)
    assert g[f"{M.HALF_RUN}_vs_pixel"] == pytest.approx({"overall_points": 2.0, "time_ratio": 0.3})
    assert g[f"{M.HALF_RUN}_vs_pixel_tuned"] == pytest.approx({"overall_points": -2.0, "time_ratio": 0.3})


def test_the_generated_pool_is_the_samplers_x0_predictions_with_the_teachers_embeddings_of_their_decodes(world):
    """What FK scores: every step's x0 prediction of search-mini's sampler, targets = teacher(decode(x0))."""
    from latentclip.miniworld import search as MS
    lat, targets, cpu = M.generated_pool(world.generator, world.vae, world.pixel_clip, 0, 3, chunk=2)
    assert lat.shape == (3 * MS.STEPS, 16, 8, 8) and targets.shape == (3 * MS.STEPS, 128) and cpu > 0
    assert torch.allclose(targets.norm(dim=-1), torch.ones(len(targets)), atol=1e-5)
    with torch.no_grad():
        decoded = torch.nn.functional.normalize(world.pixel_clip.encode_images(world.vae.decode(lat[:4])), dim=-1)
    assert torch.allclose(decoded, targets[:4], atol=1e-5)
    # chunk 2 of 3 prompts: rows of the first chunk are step-major over its 2 prompts; the last step is the
    # sample itself, sharp (its decode is far from the flat grey of early steps' blurry predictions)
    first, last = world.vae.decode(lat[:2]), world.vae.decode(lat[2 * (MS.STEPS - 1):2 * MS.STEPS])
    assert last.std() > first.std()
    again, targets2, _ = M.generated_pool(world.generator, world.vae, world.pixel_clip, 0, 3, chunk=2)
    assert torch.equal(again, lat) and torch.equal(targets2, targets)


def test_generated_rows_join_the_cosine_term_only_and_need_the_generator(world):
    recipe = {"pool": 64, "steps": 2, "batch": 32, "generated_prompts": 4, "generated_rows": 8}
    with pytest.raises(ValueError, match="generator"):
        M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    pool = M.generated_pool(world.generator, world.vae, world.pixel_clip, 0, 4)
    student, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100, generated=pool)
    assert "cosine_generated" in info["final_losses"] and info["pre_encoding"]["generated_cpu_seconds"] > 0
    direct, _ = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100, generator=world.generator)
    for (name, a), b in zip(student.clip.state_dict().items(), direct.clip.state_dict().values()):
        assert torch.equal(a, b), name
    plain, plain_info = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "generated_prompts": 0}, progress_every=100)
    assert "cosine_generated" not in plain_info["final_losses"]
    assert any(not torch.equal(a, b) for a, b in zip(plain.clip.visual.parameters(), student.clip.visual.parameters()))


def test_a_relation_share_fills_each_batch_with_that_share_and_walks_each_kind_in_epochs():
    _, _, truesets = M._train.make_pool(0, 200)
    is_rel = np.array([any(S.parse(c).kind == "relation" for c in t) for t in truesets])
    order = M._shared_batch_order(1, truesets, steps=12, batch=16, share=0.75)
    assert order.shape == (12, 16)
    assert (is_rel[order].sum(axis=1) == 12).all()
    rel = order[:, :12].ravel()
    n = int(is_rel.sum())
    assert len(set(rel[:n].tolist())) == n          # every relation scene once before any comes again
    assert not is_rel[order[:, 12:]].any()


def test_a_relation_share_changes_only_the_batches(world):
    recipe = {**NO_GENERATED, "pool": 64, "steps": 2, "batch": 32}
    _, plain = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    _, shared = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "relation_share": 1.0}, progress_every=100)
    assert shared["final_losses"]["relation"] != plain["final_losses"]["relation"]
    assert shared["recipe"]["relation_share"] == 1.0



def test_a_family_run_that_fails_after_training_leaves_no_folder(tmp_path, monkeypatch):
    def trained(worker, names, seed, recipe, tmp, what):
        (tmp / "partial.safetensors").write_bytes(b"x")
        return {}

    def failing_eval(*a, **k):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(M._train, "run_workers", trained)
    monkeypatch.setattr(M, "evaluate_family", failing_eval)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        M.train_family(tmp_path / "out", 0)
    assert list(tmp_path.iterdir()) == []


def test_the_hard_negative_losses_take_a_cpu_mask_with_gpu_embeddings():
    """The mask is built in Python on the CPU; with embeddings on a GPU, masked_fill and the hinge's product
    stopped on a device mismatch."""
    from fake_device import fake_device
    from latentclip.distill_loss import hard_negative_choice, hard_negative_margin
    torch.manual_seed(0)
    img, opts = torch.randn(3, 8), torch.randn(3, 3, 8)
    mask = torch.tensor([[True, True, False]] * 3)
    want = float(hard_negative_choice(img, opts, 100.0, mask)), float(hard_negative_margin(img, opts, 0.1, mask))
    with fake_device() as dev:
        got = (float(hard_negative_choice(img.to(dev), opts.to(dev), 100.0, mask).cpu()),
               float(hard_negative_margin(img.to(dev), opts.to(dev), 0.1, mask).cpu()))
    assert got == pytest.approx(want, rel=1e-5)


def test_a_finished_student_is_kept_when_out_was_filled_meanwhile(tmp_path, monkeypatch):
    """The student-only run published inside its clean-up: when --out was filled during training, the
    finished folder that the error names was removed."""
    out = tmp_path / "out"

    def trained(tmp, *args):
        (tmp / "student.safetensors").write_bytes(b"trained")
        out.mkdir()
        (out / "theirs.txt").write_text("written during training")
    monkeypatch.setattr(M, "_train_student_into", trained)
    with pytest.raises(FileExistsError, match="finished training is in"):
        M.train_student_only(out, 0)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.training-")]
    assert len(kept) == 1 and (kept[0] / "student.safetensors").read_bytes() == b"trained"
