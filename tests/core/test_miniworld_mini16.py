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
    recipe = {"pool": 96, "steps": 2, "batch": 32}
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


def test_the_relation_term_moves_relation_scenes_toward_their_true_caption(world):
    """A few steps with only the hard-negative relation term lower it on the training batch."""
    recipe = {"pool": 64, "steps": 6, "batch": 64, "lr": 1e-3, "warmup": 1, "contrastive_weight": 0.0,
              "relation_weight": 1.0, "relation_logit_scale": 100.0}
    _, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    assert "relation" in info["final_losses"] and info["recipe"]["relation_weight"] == 1.0


def test_only_student_copies_the_rest_and_writes_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "contrastive_cpu_per_step", lambda seed=0: {"cpu_seconds_per_step": 0.5, "steps_measured": 1,
                                                                      "recipe_steps": 2250, "cpu_seconds": 1125.0})
    recipe = {**M.RECIPE, "student": {**M.RECIPE["student"], "pool": 64, "steps": 2, "batch": 32}}
    out = M.train_student_only(tmp_path / "out", 0, recipe, evaluate=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["file"] for f in manifest["files"]} == set(M.FILES.values())
    for key in ("vae", "generator", "head"):
        assert sha256(out / M.FILES[key]) == sha256(DIR / M.FILES[key])
    assert "--only student" in manifest["trained_with"]["command"]
    assert manifest["trained_with"]["timings"]["student"]["steps"] == 2
    assert manifest["trained_with"]["timings"]["contrastive_cost"]["cpu_seconds"] == 1125.0


def test_the_recipe_is_the_shipped_students_with_the_relation_term_off():
    """RECIPE['student'] reproduces the shipped student: its manifest's recorded recipe (written before the
    relation term existed, so without relation_weight) with a missing relation_weight read as 0."""
    manifest = json.loads((DIR / "manifest.json").read_text())
    recorded = manifest["trained_with"]["recipe"]["student"]
    assert not M.RECIPE["student"].get("relation_weight")
    assert {**recorded, "relation_weight": recorded.get("relation_weight", 0.0)} == M.RECIPE["student"]


def test_a_zero_relation_weight_adds_no_relation_term(world):
    recipe = {"pool": 64, "steps": 2, "batch": 32, "relation_weight": 0.0, "relation_logit_scale": 1000.0}
    _, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    assert "relation" not in info["final_losses"]
