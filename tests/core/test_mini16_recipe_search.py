"""tools/mini16_recipe_search.py: recipes are scored on a validation split, and the pool cache is faithful."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from latentclip.miniworld import eval as E

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mini16_recipe_search", ROOT / "tools" / "mini16_recipe_search.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
torch.set_num_threads(1)


def test_the_validation_split_shares_no_scene_with_the_evaluation():
    assert tool.VALIDATION_SEED != E.EVAL_SEED
    val, ev = E.task_sets(20, seed=tool.VALIDATION_SEED), E.task_sets(20)
    for task in val:
        assert not any((a == b).all() for a in val[task]["images"] for b in ev[task]["images"])
    assert E.default_retrieval_captions(tool.VALIDATION_RETRIEVAL_DRAW)[36:] != E.default_retrieval_captions()[36:]


def test_a_run_scores_on_validation_and_a_cached_pool_gives_the_same_run(tmp_path):
    # generated rows from 3 prompts: the tool hands the folder's generator to distill
    args = ["--name", "tiny", "--recipe", json.dumps({"pool": 64, "steps": 2, "batch": 32, "generated_prompts": 3}),
            "--cache", str(tmp_path / "cache"), "--log", str(tmp_path / "runs.jsonl")]
    assert tool.main(args) == 0
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".safetensors"]
    assert tool.main(args) == 0                                         # now from the cache
    first, second = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert first["final_losses"] == second["final_losses"] and first["validation"] == second["validation"]
    assert "cosine_generated" in first["final_losses"]
    v = first["validation"]
    assert set(E.TASKS) | {"mean_shape_color_count_retrieval", "relation_axis"} <= set(v)
    assert v["relation_axis"] >= v["relation"]                          # the right relation is on the right axis


def test_the_teachers_text_tower_reads_the_relation_word_not_the_order():
    """The documented reason relations are hard to distil: the teacher's two wordings of one scene disagree."""
    from latentclip.miniworld.clips import load_latent_clip, load_pixel_clip
    teacher = tool.text_order_consistency(load_pixel_clip(tool.M.TEACHER))
    contrastive = tool.text_order_consistency(load_latent_clip(tool.M.CONTRASTIVE_DIR / "mini-latent-clip.safetensors"))
    assert teacher["mean_cosine"] < 0 < 0.5 < contrastive["mean_cosine"]


def test_a_run_needs_a_name():
    with pytest.raises(SystemExit):
        tool.main(["--recipe", "{}"])


def test_held_out_scores_are_the_evaluations():
    """--held-out reports the numbers eval --family mini16 gives: the shipped student's, as its manifest records."""
    world = tool.M.load_world(tool.M.WEIGHTS_DIR / "mini16")
    recorded = json.loads((tool.M.WEIGHTS_DIR / "mini16" / "manifest.json").read_text())["scores"]["zero_shot"]["latent"]
    scores = tool.held_out_scores(world.latent_clip, world.vae)
    for task in E.TASKS:
        assert scores[task] == pytest.approx(100 * recorded[task], abs=0.01)


def test_retrieval_draws_skip_the_evaluations_draw(monkeypatch):
    seen = []
    real = E.default_retrieval_captions

    def spy(seed=11):
        seen.append(seed)
        return real(seed)
    monkeypatch.setattr(tool.E, "default_retrieval_captions", spy)
    world = tool.M.load_world(tool.M.WEIGHTS_DIR / "mini16")
    r = tool.retrieval_over_draws(world.latent_clip, world.vae, 3)
    assert r["draws"] == 3 and len(set(seen)) == 3 and 11 not in seen
    assert r["min"] <= r["mean"] <= 100


def test_score_reads_a_saved_model_with_its_own_vae(capsys):
    """--score trains nothing; the 4-channel contrastive model is scored on its own 4-channel VAE."""
    assert tool.main(["--score", str(tool.M.CONTRASTIVE_DIR / "mini-latent-clip.safetensors"), "--retrieval-draws", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["validation"]["relation"] > 80 and out["validation"]["retrieval_draws"]["draws"] == 1
