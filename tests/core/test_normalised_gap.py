"""Normalised gaps: a true caption's lead over a false one divided by the two captions' text distance, in the
hard-negative hinge (``distill_loss.hard_negative_margin``), in caption-consistent targets and in the mini16
recipe key ``gap_weight``. A teacher whose text tower nearly merges two captions leaves them a raw lead a
hundred times smaller than distinct captions get; normalised, both count alike."""
import pytest
import torch
import torch.nn.functional as F

from latentclip.caption_targets import caption_consistent_targets, wrong_share
from latentclip.distill_loss import hard_negative_margin
from latentclip.miniworld import mini16 as M
from latentclip.miniworld import scenes as S

from test_caption_targets import _order_blind_world

torch.set_num_threads(1)


def _pair(distance: float, dim: int = 8):
    """A true and a false caption embedding ``distance`` apart (unit vectors), along axis 1 about axis 0."""
    h = distance / 2
    true = torch.zeros(dim)
    true[0], true[1] = (1 - h * h) ** 0.5, h
    false = true.clone()
    false[1] = -h
    return torch.stack([true, false])


def _leaning(lean: float, dim: int = 8):
    """A unit image embedding leaning ``lean`` along axis 1 (the pairs' own direction)."""
    e = torch.zeros(dim)
    e[0], e[1] = (1 - lean * lean) ** 0.5, lean
    return e


def test_a_normalised_gap_is_the_lean_along_the_pairs_direction_whatever_their_distance():
    img = _leaning(0.05).unsqueeze(0)
    near, far = _pair(0.002).unsqueeze(0), _pair(0.2).unsqueeze(0)
    raw_near, raw_far = hard_negative_margin(img, near, 0.1), hard_negative_margin(img, far, 0.1)
    assert float(raw_near) > float(raw_far) + 0.009            # raw: the near pair's lead is a hundred times smaller
    got_near = hard_negative_margin(img, near, 0.1, normalise_gap=True)
    got_far = hard_negative_margin(img, far, 0.1, normalise_gap=True)
    assert float(got_near) == pytest.approx(0.05, abs=1e-4) and float(got_far) == pytest.approx(0.05, abs=1e-4)


def test_a_normalised_hinge_pushes_a_near_merged_pair_as_hard_as_a_distinct_one():
    grads = []
    for distance in (0.002, 0.2):
        img = _leaning(0.0).unsqueeze(0).requires_grad_(True)
        hard_negative_margin(img, _pair(distance).unsqueeze(0), 0.1, normalise_gap=True).backward()
        grads.append(float(img.grad[0, 1]))
    assert grads[0] < 0 and grads[0] == pytest.approx(grads[1], rel=1e-3)   # both push along +axis 1 alike
    ahead = _leaning(0.2).unsqueeze(0).requires_grad_(True)                # past the margin: no pull
    hard_negative_margin(ahead, _pair(0.002).unsqueeze(0), 0.1, normalise_gap=True).backward()
    assert float(ahead.grad.abs().max()) == 0.0


def test_a_normalised_hinge_skips_masked_columns_and_matches_on_a_second_device():
    from fake_device import fake_device
    torch.manual_seed(0)
    img, opts = torch.randn(3, 8), torch.randn(3, 3, 8)
    mask = torch.tensor([[True, True, False]] * 3)
    full = hard_negative_margin(img, opts[:, :2], 0.1, normalise_gap=True)
    masked = hard_negative_margin(img, opts, 0.1, mask, normalise_gap=True)
    assert float(masked) == pytest.approx(float(full), rel=1e-6)
    with fake_device() as dev:
        got = hard_negative_margin(img.to(dev), opts.to(dev), 0.1, mask, normalise_gap=True)
        assert got.device == dev
        got = float(got.cpu())
    assert got == pytest.approx(float(masked), rel=1e-5)


def _merged_world(n_per_set: int = 20):
    """``test_caption_targets``'s two confused captions, here nearly merged (about 0.004 apart)."""
    return _order_blind_world(n_per_set, spread=0.002, noise=0.002)


def test_normalised_targets_lean_each_set_along_its_pair_and_leave_the_input_alone():
    target, text, truth = _merged_world()
    before = target.clone()
    out, stats = caption_consistent_targets(target, text, truth, margin=0.05, pull=0.01, normalise_gap=True)
    assert torch.equal(target, before)
    assert stats["normalised_gap"] is True and stats["wrong_before"] > 0.3
    assert wrong_share(out, text, truth) == stats["wrong_after"] == 0.0
    direction = F.normalize(text[0] - text[1], dim=0)
    lean = out @ direction
    assert float(lean[:20].min()) > 0.02 and float(lean[20:].max()) < -0.02      # each set along its own caption
    assert stats["cosine_to_teacher_min"] > 0.9                                   # a lean, not a new target
    _, raw_stats = caption_consistent_targets(target, text, truth, margin=0.05, pull=0.01)
    assert raw_stats["normalised_gap"] is False
    assert raw_stats["cosine_to_teacher_mean"] < stats["cosine_to_teacher_mean"]  # the same margin raw: far moves


def test_normalised_targets_match_on_a_second_device():
    from fake_device import fake_device
    target, text, truth = _merged_world(n_per_set=5)
    want, _ = caption_consistent_targets(target, text, truth, 0.05, 0.01, iters=50, normalise_gap=True)
    with fake_device() as dev:
        got, _ = caption_consistent_targets(target.to(dev), text.to(dev), truth.to(dev), 0.05, 0.01, iters=50,
                                            normalise_gap=True)
        assert got.device == dev
        got = got.cpu()
    assert torch.allclose(got, want, atol=1e-5)


def test_the_gap_recipe_key_adds_a_term_over_both_word_orders():
    world = M.load_world(M.WEIGHTS_DIR / "mini16")
    recipe = {"generated_prompts": 0, "pool": 96, "steps": 3, "batch": 48, "warmup": 1, "relation_share": 0.65}
    _, plain = M.distill(world.vae, world.pixel_clip, 0, recipe, progress_every=100)
    _, info = M.distill(world.vae, world.pixel_clip, 0, {**recipe, "gap_weight": 10.0, "gap_margin": 0.02,
                                                           "gap_both_orders": True}, progress_every=100)
    assert "gap" not in plain["final_losses"] and info["final_losses"]["gap"] > 0
    assert info["final_losses"]["cosine"] != plain["final_losses"]["cosine"]


def test_the_gap_term_is_none_for_a_batch_without_relation_scenes_and_counts_both_orders():
    batch = S.make_batch(7, 12, "single")
    truesets = [set(S.true_captions(s)) for s in batch.scenes]
    text = M.teacher_text_embeddings(M.load_world(M.WEIGHTS_DIR / "mini16").pixel_clip, S.all_captions())
    emb = torch.randn(12, next(iter(text.values())).shape[0])
    assert M.relation_choice_loss(emb, list(range(12)), truesets, text, 0.0, 0.02, True, normalise_gap=True) is None
    rel = S.make_batch(8, 12, "relation")
    truesets = [set(S.true_captions(s)) for s in rel.scenes]
    one = M.relation_choice_loss(emb, list(range(12)), truesets, text, 0.0, 0.02, False, normalise_gap=True)
    both = M.relation_choice_loss(emb, list(range(12)), truesets, text, 0.0, 0.02, True, normalise_gap=True)
    assert float(one) > 0 and float(both) > 0 and float(one) != float(both)
