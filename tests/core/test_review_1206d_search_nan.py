"""Review 1206d, search: a particle whose x0 prediction diverged (NaN/inf, e.g. an fp16 model that
overflowed) scores NaN and ranks last instead of a Latent-CLIP term refusing the whole batch with an
error that blames the user's latent; the other particles go on exactly as in a clean run. Only when
every particle (of an item) diverged does the search stop, with an error that names the sampler."""
import math

import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.rewards import LatentMatch
from latentclip.search import SearchSettings, reward_scorer, search

torch.set_num_threads(1)
SHAPE = (4, 16, 16)
N = 4
STEPS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


@pytest.fixture(scope="module")
def score(model):
    return reward_scorer([LatentMatch(model, "a car")], 1)


def walk(diverge=None, at=None, log=None):
    """x += fixed noise of (step, row); x0 prediction = x. ``diverge`` rows turn NaN at step ``at`` (1-based)
    and stay NaN (x + noise), until pruning or resampling drops them."""
    def advance(x, start, end):
        x0s = []
        for i in range(start, end):
            g = torch.Generator().manual_seed(100 + i)
            x = x + torch.randn(x.shape, generator=g)
            if diverge is not None and i + 1 == at:
                x = x.clone()
                x[list(diverge)] = float("nan")
            x0s.append(x.clone())
            if log is not None:
                log.append(x)
        return x, x0s
    return advance


def start(batch=1):
    return torch.randn(N * batch, *SHAPE, generator=torch.Generator().manual_seed(7))


def clean_rewards(score, steps=STEPS, batch=1):
    """Each particle's reward after each step of an unsteered run: [steps, N * batch]."""
    log = []
    walk(log=log)(start(batch), 0, steps)
    return torch.stack([score(x)[0] for x in log])


# -- the scorer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_reward_scorer_scores_a_non_finite_row_nan_and_the_others_as_before(model, score, bad):
    lat = start()
    r_clean, v_clean = score(lat)
    broken = lat.clone()
    broken[2, 1, 3, 4] = bad
    kept = broken.clone()
    r, values = score(broken)                      # raised InputError "latents contains NaN ..." before the fix
    assert torch.equal(torch.nan_to_num(broken), torch.nan_to_num(kept))     # the input is not modified
    assert math.isnan(r[2]) and torch.allclose(r[[0, 1, 3]], r_clean[[0, 1, 3]], atol=1e-6)
    assert set(values) == set(v_clean)
    for k, v in values.items():
        assert math.isnan(v[2]) and torch.allclose(v[[0, 1, 3]], v_clean[k][[0, 1, 3]], atol=1e-6), k


def test_reward_scorer_with_per_item_prompts_scores_a_non_finite_row_nan(model):
    score2 = reward_scorer([LatentMatch(model, ["a car", "a boat"])], 2)
    lat = start(1)                                 # 4 rows = 2 slots x 2 items
    broken = lat.clone()
    broken[3] = float("nan")
    r_clean, r = score2(lat)[0], score2(broken)[0]
    assert math.isnan(r[3]) and torch.allclose(r[:3], r_clean[:3], atol=1e-6)


def test_reward_scorer_of_only_non_finite_rows_is_all_nan(score):
    r, values = score(torch.full((2, *SHAPE), float("nan")))
    assert r.shape == (2,) and bool(r.isnan().all()) and all(bool(v.isnan().all()) for v in values.values())


# -- best of N --------------------------------------------------------------------------------------------
def test_best_of_n_goes_on_without_a_diverged_particle_and_picks_as_a_clean_run(score):
    clean = search(walk(), start(), STEPS, score, 1, SearchSettings("best_of_n", N))
    loser = min(set(range(N)) - {clean.best_slot[0]})
    res = search(walk(diverge=[loser], at=2), start(), STEPS, score, 1, SearchSettings("best_of_n", N))
    assert res.best_slot == clean.best_slot and res.best_reward == pytest.approx(clean.best_reward, abs=1e-6)
    assert torch.equal(res.samples, clean.samples)
    final = res.history["reward"][-1][0]
    assert math.isnan(final[loser])
    assert [v for s, v in enumerate(final) if s != loser] == pytest.approx(
        [v for s, v in enumerate(clean.history["reward"][-1][0]) if s != loser], abs=1e-6)


def test_best_of_n_never_picks_a_diverged_particle_over_a_finite_one(score):
    clean = search(walk(), start(), STEPS, score, 1, SearchSettings("best_of_n", N))
    winner = clean.best_slot[0]
    res = search(walk(diverge=[winner], at=STEPS), start(), STEPS, score, 1, SearchSettings("best_of_n", N))
    finals = clean.history["reward"][-1][0]
    runner_up = max((s for s in range(N) if s != winner), key=lambda s: finals[s])
    assert res.best_slot == [runner_up] and bool(torch.isfinite(res.samples).all())
    assert res.best_reward == pytest.approx([finals[runner_up]], abs=1e-6)


# -- prune --------------------------------------------------------------------------------------------------
def test_prune_drops_a_diverged_particle_and_keeps_the_best_finite_ones(score):
    st = SearchSettings("prune", N, prune_at=(1,), keep=0.5)
    clean = search(walk(), start(), STEPS, score, 1, st)
    first = clean.history["reward"][0][0]
    top = sorted(range(N), key=lambda s: -first[s])
    bad = top[0]                                 # the clean run's best after step 1 diverges at step 1
    res = search(walk(diverge=[bad], at=1), start(), STEPS, score, 1, st)
    assert res.history["events"][0]["kept_slots"] == [top[1:3]]
    assert bad not in res.history["events"][0]["kept_slots"][0] and bool(torch.isfinite(res.samples).all())
    got = res.history["reward"][0][0]
    assert math.isnan(got[bad]) and [got[s] for s in top[1:]] == pytest.approx([first[s] for s in top[1:]], abs=1e-6)


def test_prune_with_a_diverged_loser_keeps_what_a_clean_run_keeps(score):
    st = SearchSettings("prune", N, prune_at=(1,), keep=0.5)
    clean = search(walk(), start(), STEPS, score, 1, st)
    first = clean.history["reward"][0][0]
    worst = min(range(N), key=lambda s: first[s])
    res = search(walk(diverge=[worst], at=1), start(), STEPS, score, 1, st)
    assert res.history["events"] == clean.history["events"]
    assert res.best_slot == clean.best_slot and torch.equal(res.samples, clean.samples)


# -- FK steering -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("potential", ["difference", "value", "max"])
@pytest.mark.parametrize("temperature", [0.0, 30.0])
def test_fk_steering_never_resamples_a_diverged_particle(score, potential, temperature):
    st = SearchSettings("fk_steering", N, potential=potential, temperature=temperature, start=1, seed=3)
    clean = search(walk(), start(), STEPS, score, 1, st)
    bad = 1
    res = search(walk(diverge=[bad], at=1), start(), STEPS, score, 1, st)
    anc = res.history["events"][0]["ancestors"][0]
    assert bad not in anc and bool(torch.isfinite(res.samples).all())
    assert all(math.isfinite(e) for ev in res.history["events"] for e in ev["ess"])
    got, ref = res.history["reward"][0][0], clean.history["reward"][0][0]
    assert math.isnan(got[bad])
    assert [got[s] for s in range(N) if s != bad] == pytest.approx([ref[s] for s in range(N) if s != bad], abs=1e-6)
    assert all(math.isfinite(v) for v in res.best_reward)


# -- every particle diverged ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, scored", [("best_of_n", 3), ("prune", 2), ("fk_steering", 2)])
def test_every_particle_diverged_is_one_error_that_names_the_sampler(score, strategy, scored):
    kw = {"prune_at": (2,)} if strategy == "prune" else {"start": 1} if strategy == "fk_steering" else {}
    with pytest.raises(InputError) as e:
        search(walk(diverge=range(N), at=2), start(), STEPS, score, 1, SearchSettings(strategy, N, **kw))
    msg = str(e.value)
    assert "every particle" in msg and f"step {scored}" in msg and "sampler" in msg, msg
    assert "VAE" not in msg and "latents contains" not in msg, msg


def test_every_particle_of_one_item_diverged_names_that_item(model):
    score2 = reward_scorer([LatentMatch(model, "a car")], 2)
    rows = [s * 2 + 1 for s in range(N)]           # item 2 (index 1) of a batch of 2, every slot
    with pytest.raises(InputError, match=r"every particle of item 2 .*step 3"):
        search(walk(diverge=rows, at=1), start(2), STEPS, score2, 2, SearchSettings("best_of_n", N))
