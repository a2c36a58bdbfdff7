"""Review 1204e, search core: a particle whose reward is NaN (a pixel reward's fp16 VAE decode that
overflowed, a diverged particle) ranks last, as FK's resampling already weighs it."""
import math

import pytest
import torch

from latentclip.search import SearchSettings, search

torch.set_num_threads(1)


def frozen(x, start, end):
    """Particles that stay where they are; x0 prediction = the state."""
    return x, [x.clone() for _ in range(start, end)]


def nan_for_the_top(x0):
    """Reward = the row's value, NaN for values >= 7 (slot 3 of both items below)."""
    r = x0[:, 0].clone()
    r[r >= 7] = float("nan")
    return r, {}


#: slot-major rows s * B + b: item 0 holds 1, 3, 5, 7; item 1 holds 2, 4, 6, 8 (slot 3 scores NaN)
START = torch.arange(1.0, 9.0).view(8, 1)


def test_best_of_n_never_returns_a_particle_whose_reward_is_nan():
    res = search(frozen, START.clone(), 2, nan_for_the_top, 2, SearchSettings("best_of_n", 4))
    assert res.best_slot == [2, 2] and res.best_reward == [5.0, 6.0]
    assert res.samples.view(-1).tolist() == [5.0, 6.0]


def test_prune_drops_a_particle_whose_reward_is_nan_first():
    res = search(frozen, START.clone(), 2, nan_for_the_top, 2, SearchSettings("prune", 4, prune_at=(1,), keep=0.25))
    assert res.history["events"][0]["kept_slots"] == [[2], [2]]
    assert res.best_slot == [2, 2] and res.samples.view(-1).tolist() == [5.0, 6.0]


def test_rewards_all_nan_still_pick_a_particle_and_report_nan():
    res = search(frozen, START.clone(), 2, lambda x0: (x0[:, 0] * float("nan"), {}), 2, SearchSettings("best_of_n", 4))
    assert res.samples.shape == (2, 1) and all(math.isnan(r) for r in res.best_reward)


@pytest.mark.parametrize("strategy", ["best_of_n", "prune", "fk_steering"])
def test_the_preview_is_the_best_finite_particle(strategy):
    seen = []
    kw = {"prune_at": (1,), "keep": 0.5} if strategy == "prune" else {"start": 1}
    search(frozen, START.clone(), 2, nan_for_the_top, 2, SearchSettings(strategy, 4, temperature=0.0, **kw),
           callback=lambda step, best_x0, x: seen.append(best_x0.view(-1).tolist()))
    assert all(not any(math.isnan(v) or v >= 7 for v in row) for row in seen), seen
