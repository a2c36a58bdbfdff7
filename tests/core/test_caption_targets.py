"""Caption-consistent distillation targets (``latentclip.caption_targets``) and the mini16 recipe key that
uses them (``target_margin``): targets moved so the teacher's own text tower scores true captions above false
ones, one move per caption set, nothing moved that is already right, and bad input refused by name."""
import pytest
import torch
import torch.nn.functional as F

from latentclip.caption_targets import caption_consistent_targets, wrong_share
from latentclip.miniworld import mini16 as M

torch.set_num_threads(1)


def _order_blind_world(n_per_set: int = 20, seed: int = 0, spread: float = 0.05, noise: float = 0.02):
    """Two captions a text tower nearly confuses ("A left of B" / "B left of A": the same vector but for a
    small direction, ``spread`` long), and images of which one or the other is true, embedded by a teacher
    that cannot tell them apart (the same embedding plus ``noise``). A third caption is true of neither."""
    g = torch.Generator().manual_seed(seed)
    common, small, other = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    text = F.normalize(torch.stack([common + spread * small, common - spread * small, other]), dim=-1)
    target = common + noise * torch.randn(2 * n_per_set, 16, generator=g)
    truth = torch.zeros(2 * n_per_set, 3, dtype=torch.bool)
    truth[:n_per_set, 0] = True
    truth[n_per_set:, 1] = True
    return target, text, truth


def test_targets_move_until_the_teachers_text_tower_scores_the_true_caption_first():
    target, text, truth = _order_blind_world()
    before = target.clone()
    out, stats = caption_consistent_targets(target, text, truth, margin=0.01, pull=0.01)
    assert torch.equal(target, before)                                   # the input is not modified
    assert stats["wrong_before"] > 0.3                                   # the teacher confuses the two
    assert wrong_share(out, text, truth) == stats["wrong_after"] == 0.0
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(out)), atol=1e-5)
    assert stats["caption_sets"] == 2 and stats["images"] == len(target)
    assert 0.5 < stats["cosine_to_teacher_min"] <= stats["cosine_to_teacher_mean"] < 1.0


def test_a_larger_pull_moves_the_targets_less():
    target, text, truth = _order_blind_world()
    _, loose = caption_consistent_targets(target, text, truth, margin=0.01, pull=0.01)
    _, tight = caption_consistent_targets(target, text, truth, margin=0.01, pull=100.0)
    assert tight["cosine_to_teacher_mean"] > loose["cosine_to_teacher_mean"]


def test_targets_already_right_by_the_margin_are_returned_unchanged():
    target, text, truth = _order_blind_world()
    right = F.normalize(torch.where(truth[:, :1], text[0], text[1]), dim=-1)   # each image on its own caption
    out, stats = caption_consistent_targets(right, text, truth, margin=0.0, pull=0.1)
    assert stats["wrong_before"] == stats["wrong_after"] == 0.0
    assert torch.allclose(out, right, atol=1e-6)


def test_images_with_no_true_caption_are_left_as_the_teacher_made_them():
    target, text, truth = _order_blind_world()
    truth[:5] = False
    out, _ = caption_consistent_targets(target, text, truth, margin=0.01, pull=0.01)
    assert torch.allclose(out[:5], F.normalize(target[:5], dim=-1))


@pytest.mark.parametrize("kwargs, words", [({"margin": -0.1}, "margin"), ({"pull": -1.0}, "pull")])
def test_negative_settings_are_refused_by_name(kwargs, words):
    target, text, truth = _order_blind_world()
    with pytest.raises(ValueError, match=words):
        caption_consistent_targets(target, text, truth, **{"margin": 0.01, **kwargs})


def test_a_truth_table_of_the_wrong_shape_is_refused_naming_both_shapes():
    target, text, truth = _order_blind_world()
    with pytest.raises(ValueError, match=r"truth must be \[images, captions\] = \[40, 3\], got \[40, 2\]"):
        caption_consistent_targets(target, text, truth[:, :2], margin=0.01)


def test_the_mini16_recipe_key_corrects_the_pool_on_the_training_clock():
    world = M.load_world(M.WEIGHTS_DIR / "mini16")
    recipe = {"generated_prompts": 0, "pool": 96, "steps": 3, "batch": 48, "warmup": 1}
    _, plain = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    _, info = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "target_margin": 0.005, "target_pull": 0.01},
                        progress_every=100)
    assert "target_correction" not in plain
    c = info["target_correction"]
    assert c["images"] == 96 and c["margin"] == 0.005 and c["pull"] == 0.01
    assert c["wrong_after"] < c["wrong_before"]
    assert info["train_cpu_seconds"] >= c["cpu_seconds"]
    # a different target changes what the student is regressed to
    assert info["final_losses"]["cosine"] != plain["final_losses"]["cosine"]
