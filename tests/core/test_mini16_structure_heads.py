"""The mini16 recipe's throw-away heads (``order_weight``, ``count_weight``) and the contrastive term's
both-orders negatives: labels read from the captions, heads that train with the student and are not saved."""
import pytest
import torch

from latentclip.miniworld import mini16 as M
from latentclip.miniworld import scenes as S

torch.set_num_threads(1)
NO_GENERATED = {"generated_prompts": 0}


@pytest.fixture(scope="module")
def world():
    return M.load_world(M.WEIGHTS_DIR / "mini16")


def _relation_set(caption: str) -> set:
    """The true captions of a relation scene described by ``caption`` (both wordings)."""
    spec = S.parse(caption)
    other = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
             "below": "above"}[spec.relation]
    return {caption, M.relation_caption(spec, other, swapped=True)}


def test_order_labels_name_where_the_first_sorted_object_lies_whichever_wording_the_scene_holds():
    sets = [_relation_set("a red circle above a yellow triangle"),      # red circle sorts first: above
            _relation_set("a yellow triangle below a red circle"),      # the same scene, other wording
            _relation_set("a yellow square to the left of a blue circle"),  # blue circle first: right of
            {"two red circles"}, {"a red circle", "a red object", "a circle"},
            _relation_set("a red circle to the left of a red circle")]  # two equal objects: no order
    rows, labels = M.order_labels(range(len(sets)), sets)
    assert rows == [0, 1, 2]
    assert [S.RELATIONS[k] for k in labels] == ["above", "above", "to the right of"]


def test_count_labels_count_the_objects_of_every_kind_of_scene():
    sets = [{"a red circle", "a red object", "a circle"}, {"three green triangles"}, {"two blue squares"},
            _relation_set("a red circle above a yellow triangle")]
    assert M.count_labels(range(4), sets) == [0, 2, 1, 1]


def test_both_orders_negatives_add_the_other_wordings_that_are_false_of_every_kept_scene():
    cap = "a red circle above a yellow triangle"
    kept = [_relation_set(cap)]
    one = M._hard_negatives([cap], kept)
    both = M._hard_negatives([cap], kept, both_orders=True)
    assert set(one) < set(both)
    assert "a yellow triangle above a red circle" in both            # the order confusion retrieval meets
    assert "a yellow triangle below a red circle" not in both        # true of the scene: never a negative
    assert not any(n in t for t in kept for n in both)


def test_the_heads_train_with_the_student_and_leave_its_parameters_alone(world):
    """A few steps with each head: its loss is logged and falls, and the saved student has the same
    parameters (names and shapes) as one trained without the heads."""
    recipe = {**NO_GENERATED, "pool": 96, "steps": 8, "batch": 48, "warmup": 1}
    plain, plain_info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    headed, info = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "order_weight": 1.0, "count_weight": 1.0},
                             progress_every=100)
    assert {"order", "count"} <= set(info["final_losses"]) and "order" not in plain_info["final_losses"]
    assert info["trained_parameters"] == plain_info["trained_parameters"]
    shapes = {k: v.shape for k, v in plain.clip.state_dict().items()}
    assert {k: v.shape for k, v in headed.clip.state_dict().items()} == shapes
    changed = [k for k, v in headed.clip.state_dict().items() if not torch.equal(v, plain.clip.state_dict()[k])]
    assert changed and all(k.startswith("visual.") for k in changed)   # the heads' gradients reach the image tower only


def test_a_head_loss_falls_on_its_own(world):
    """With only the order head (no other term), its loss on the training batches falls: the label is learnable."""
    recipe = {**NO_GENERATED, "pool": 64, "steps": 30, "batch": 64, "warmup": 1, "contrastive_weight": 0.0,
              "relation_weight": 0.0, "order_weight": 1.0, "relation_share": 1.0}
    losses = []
    _, info = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "steps": 1}, progress_every=100)
    losses.append(info["final_losses"]["order"])
    _, info = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    losses.append(info["final_losses"]["order"])
    assert losses[1] < losses[0]


def test_the_fast_recipe_is_the_shipped_one_with_the_compute_comparisons_changes():
    fast, shipped = M.FAST_STUDENT, M.RECIPE["student"]
    assert set(fast) >= set(shipped) and fast["steps"] == 950 and fast["generated_prompts"] == 0
    assert fast["order_weight"] > 0 and fast["count_weight"] > 0
    assert fast["target_margin"] > 0 and fast["target_pull"] > 0 and "target_margin" not in shipped
    assert fast["gap_weight"] > 0 and fast["gap_both_orders"] and "gap_weight" not in shipped


def test_the_cli_trains_the_fast_student_only_into_a_folder_it_is_given(tmp_path, monkeypatch, capsys):
    from latentclip.miniworld.__main__ import main
    calls = []
    monkeypatch.setattr(M, "train_student_only", lambda **kw: calls.append(kw))
    assert main(["train", "--family", "mini16", "--only", "student", "--student-recipe", "fast"]) == 2
    assert "give --out" in capsys.readouterr().err and not calls
    assert main(["train", "--family", "mini16", "--student-recipe", "fast", "--out", str(tmp_path / "x")]) == 2
    assert "needs --family mini16 --only student" in capsys.readouterr().err and not calls
    assert main(["train", "--family", "mini16", "--only", "student", "--student-recipe", "fast",
                 "--out", str(tmp_path / "x"), "--no-eval"]) == 0
    assert calls[0]["recipe"]["student"] == M.FAST_STUDENT and calls[0]["recipe_name"] == "fast"
    assert main(["train", "--family", "mini16", "--only", "student", "--out", str(tmp_path / "y"), "--no-eval"]) == 0
    assert calls[1]["recipe"] is None and calls[1]["recipe_name"] == "shipped"


def test_the_recorded_fast_run_is_the_fast_recipe_on_the_shipped_vae_and_teacher():
    import json
    from latentclip.miniworld.manifest import sha256
    record = json.loads((M.WEIGHTS_DIR / "mini16" / M.FAST_RUN).read_text())
    assert record["trained_with"]["recipe"]["student"] == M.FAST_STUDENT
    assert "--student-recipe fast" in record["trained_with"]["command"]
    assert record["teacher"]["sha256"] == sha256(M.TEACHER)
    vae = next(f for f in record["files"] if f["file"] == M.FILES["vae"])
    assert vae["sha256"] == sha256(M.WEIGHTS_DIR / "mini16" / M.FILES["vae"])
    s = M.fast_run_summary(record)
    assert s["target_correction"]["margin"] == M.FAST_STUDENT["target_margin"]
    assert s["target_correction"]["cpu_seconds"] <= s["student_cpu_seconds"]   # on the training clock
    assert abs(s["cpu_ratio"] - s["student_cpu_seconds"] / s["contrastive_cpu_seconds"]) < 1e-9
    last = s["student_trajectory"][-1]
    assert last["step"] == 950 and abs(last["mean_shape_color_count_retrieval"] - s["student_zero_shot_mean"]) < 0.01
    assert s["reached"] == any(p["mean_shape_color_count_retrieval"] >= s["contrastive_zero_shot_mean"]
                               and p["train_cpu_seconds"] <= 0.2 * s["contrastive_cpu_seconds"] for p in s["student_trajectory"])
