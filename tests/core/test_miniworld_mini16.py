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
