"""Inference-time search core: strategies on a toy process, costs, determinism, errors, reward scoring."""
import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.rewards import LatentAvoid, LatentMatch
from latentclip.search import (SearchSettings, auto_start, expand_items, particle_steps, prune_counts, reward_scorer, search)

torch.set_num_threads(1)
STEPS = 6


def toy_process(batch, seed=0, log=None):
    """A random walk per particle: x += noise each step; x0 prediction = x. Records rows advanced."""
    gen = torch.Generator().manual_seed(seed)

    def advance(x, start, end):
        x0s = []
        for i in range(start, end):
            x = x + torch.randn(x.shape, generator=gen)
            x0s.append(x.clone())
            if log is not None:
                log.append((i, x.shape[0]))
        return x, x0s
    return advance


def toy_score(x):
    """Reward: the walk's value (higher is better)."""
    return x.view(x.shape[0], -1).mean(1), {"value": x.view(x.shape[0], -1).mean(1)}


def start(particles, batch):
    return torch.zeros(particles * batch, 1)


def test_best_of_n_returns_each_items_highest_final_reward():
    batch, n = 3, 5
    finals = {}

    def advance(x, a, b):
        x, x0s = toy_process(batch)(x, a, b)
        finals["x"] = x
        return x, x0s
    res = search(advance, start(n, batch), STEPS, toy_score, batch, SearchSettings("best_of_n", n))
    grid = finals["x"].view(n, batch)
    assert torch.equal(res.samples.view(-1), grid.max(0).values)
    assert res.best_reward == pytest.approx(grid.max(0).values.tolist())
    assert res.particle_steps == n * batch * STEPS
    assert res.history["scored_steps"] == [STEPS] and res.history["events"] == []


def test_prune_drops_the_worst_and_never_runs_their_remaining_steps():
    batch, n, log = 2, 8, []
    st = SearchSettings("prune", n, prune_at=(2, 4), keep=0.5)
    res = search(toy_process(batch, log=log), start(n, batch), STEPS, toy_score, batch, st)
    assert prune_counts(n, STEPS, (2, 4), 0.5) == [8, 8, 4, 4, 2, 2]
    assert [rows for _, rows in log] == [c * batch for c in [8, 8, 4, 4, 2, 2]]
    assert res.particle_steps == batch * sum([8, 8, 4, 4, 2, 2]) == batch * particle_steps(st, STEPS)
    events = res.history["events"]
    assert [e["step"] for e in events] == [2, 4] and [e["kept"] for e in events] == [4, 2]
    # the kept particles at step 2 are each item's four best at step 2
    at2 = torch.tensor(res.history["reward"][0])                  # [B, N]
    for b in range(batch):
        assert sorted(events[0]["kept_slots"][b]) == sorted(at2[b].argsort(descending=True)[:4].tolist())


def test_fk_resamples_toward_high_rewards_and_beats_best_of_n_on_a_walk():
    batch, n = 16, 8
    bon = search(toy_process(batch, 1), start(n, batch), STEPS, toy_score, batch, SearchSettings("best_of_n", n))
    fk = search(toy_process(batch, 1), start(n, batch), STEPS, toy_score, batch,
                SearchSettings("fk_steering", n, potential="difference", temperature=5.0, interval=1, start=1))
    assert fk.particle_steps == bon.particle_steps               # resampling copies; it re-runs nothing
    events = fk.history["events"]
    assert [e["step"] for e in events] == list(range(1, STEPS)) and all(e["kind"] == "resample" for e in events)
    # after resampling, lineages collapse: fewer distinct original slots survive than particles
    assert min(min(s) for s in fk.history["survivors"][1:]) < n
    assert sum(fk.best_reward) / batch > sum(bon.best_reward) / batch


def test_fk_resamples_within_each_item_and_the_difference_follows_the_ancestors():
    """Rows are (reward, increment); item 0's best start is slot 0, item 1's is slot 1. With a huge
    lambda the first resampling copies each item's own best; the copies then rise equally, so the
    difference potential (r_now - r of the ancestor at the last resampling) is equal: ESS = N."""
    batch, n = 2, 2
    x = torch.tensor([[10.0, 1.0], [0.0, 1.0],      # slot 0: item 0, item 1
                      [0.0, 1.0], [20.0, 1.0]])     # slot 1: item 0, item 1

    def advance(x, start, end):
        x0s = []
        for _ in range(start, end):
            x = torch.stack([x[:, 0] + x[:, 1], x[:, 1]], 1)
            x0s.append(x.clone())
        return x, x0s
    score = lambda x0: (x0[:, 0], {})
    res = search(advance, x, 4, score, batch, SearchSettings("fk_steering", n, temperature=1e4, start=1))
    first, *later = res.history["events"]
    assert first["ancestors"] == [[0, 0], [1, 1]]          # per item: its own best slot, never another item's
    assert all(e["ess"] == [pytest.approx(n), pytest.approx(n)] for e in later)
    assert res.best_slot == [0, 1] and res.best_reward == [14.0, 24.0]


def test_a_carry_follows_its_rows_through_resampling_and_pruning():
    """An advance that looks ahead hands per-row data on; the search gathers it with the particles, so
    each row gets back exactly the carry computed for the state it now holds."""
    batch, n, calls = 3, 5, []

    def advance(x, start, end, carry=None):
        if carry is not None:
            assert torch.equal(carry, x * 2)            # the carry made for this very state
        calls.append(carry is not None)
        x0s = []
        for _ in range(start, end):
            x = x + torch.randn(x.shape)
            x0s.append(x.clone())
        return x, x0s, x * 2
    for st in (SearchSettings("fk_steering", n, temperature=3.0, start=1),
               SearchSettings("prune", n, prune_at=(2, 4), keep=0.5)):
        calls.clear()
        res = search(advance, start(n, batch), STEPS, toy_score, batch, st)
        assert calls[0] is False and all(calls[1:]) and len(calls) == len(st.action_steps(STEPS)) + 1
        assert res.samples.shape == (batch, 1) and res.history["lookahead"] is True
    assert search(toy_process(batch), start(n, batch), STEPS, toy_score, batch,
                  SearchSettings("fk_steering", n, start=1)).history["lookahead"] is False


def test_a_carry_of_the_wrong_rows_is_refused():
    advance = lambda x, a, b, carry=None: (x, [x] * (b - a), x[:1])
    with pytest.raises(InputError, match="carry of 1 rows for 4 particle rows"):
        search(advance, start(2, 2), 3, toy_score, 2, SearchSettings("fk_steering", 2, start=1))


def test_auto_start_is_where_scores_become_informative():
    assert [auto_start(s) for s in (2, 4, 8, 20, 30)] == [1, 1, 2, 5, 7]


def test_fk_interval_start_stop_choose_the_resampling_steps():
    st = SearchSettings("fk_steering", 4, interval=2, start=1, stop=4)
    assert st.action_steps(8) == [1, 3]
    assert SearchSettings("fk_steering", 4, interval=3, start=2).action_steps(8) == [2, 5]


@pytest.mark.parametrize("potential", ["difference", "value", "max"])
def test_same_seed_same_result_other_seed_other_ancestors(potential):
    batch, n = 2, 6
    run = lambda seed: search(toy_process(batch, 3), start(n, batch), STEPS, toy_score, batch,
                              SearchSettings("fk_steering", n, potential=potential, temperature=0.5, seed=seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.samples, b.samples) and a.history["events"] == b.history["events"]
    assert a.history["events"] != c.history["events"]


def test_temperature_zero_is_uniform_resampling():
    batch, n = 1, 4
    res = search(toy_process(batch), start(n, batch), STEPS, toy_score, batch,
                 SearchSettings("fk_steering", n, temperature=0.0))
    assert all(e["ess"] == [pytest.approx(n)] for e in res.history["events"])


def test_trace_scores_every_step_without_changing_the_result():
    batch, n = 2, 3
    plain = search(toy_process(batch), start(n, batch), STEPS, toy_score, batch, SearchSettings("fk_steering", n, interval=2))
    traced = search(toy_process(batch), start(n, batch), STEPS, toy_score, batch,
                    SearchSettings("fk_steering", n, interval=2, trace=True))
    assert torch.equal(plain.samples, traced.samples)
    assert sorted(map(int, traced.history["trace"])) == list(range(1, STEPS + 1))
    assert plain.history["trace"] == {}


@pytest.mark.parametrize("kw, match", [
    ({"particles": 0}, "particles must be an integer >= 1"),
    ({"strategy": "beam"}, "strategy must be one of"),
    ({"interval": STEPS}, "must be below the sampler's 6 steps"),
    ({"start": 7}, "must be below the sampler's 6 steps"),
    ({"temperature": -1.0}, "temperature"),
    ({"potential": "sum"}, "potential must be one of"),
    ({"strategy": "prune", "prune_at": (9,)}, "prune_at step 9 is beyond the sampler's 6 steps"),
    ({"strategy": "prune", "prune_at": ()}, "prune_at is empty"),
    ({"strategy": "prune", "prune_at": (2,), "keep": 1.0}, "keep must be a share"),
])
def test_bad_settings_raise_one_clear_error(kw, match):
    with pytest.raises(InputError, match=match):
        search(toy_process(1), start(kw.get("particles", 2) or 1, 1), STEPS, toy_score, 1, SearchSettings(**kw))


def test_wrong_particle_count_is_refused():
    with pytest.raises(InputError, match="initial particles must be a tensor with 4 x 2 rows"):
        search(toy_process(2), torch.zeros(6, 1), STEPS, toy_score, 2, SearchSettings("best_of_n", 4))


def test_reward_scorer_pairs_per_item_prompts_with_slot_major_rows():
    torch.manual_seed(0)
    model = LatentCLIP("Latent-ViT-Tiny-test").eval()
    prompts = ["a red car", "a blue boat"]
    lat = torch.randn(3 * 2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    score = reward_scorer([LatentMatch(model, prompts), LatentAvoid(model, ["rain", "snow"])], batch=2)
    r, values = score(lat)
    for s in range(3):
        ref_m = LatentMatch(model, prompts).evaluate(lat[2 * s:2 * s + 2])[0]
        ref_a = LatentAvoid(model, ["rain", "snow"]).evaluate(lat[2 * s:2 * s + 2])[0]
        assert torch.allclose(r[2 * s:2 * s + 2], -0.01 * (ref_m + ref_a), atol=1e-5)
    assert set(values) >= {"match", "avoid", "match/cos"} and values["match"].shape == (6,)


def test_expand_items_is_slot_major():
    t = torch.arange(3).view(3, 1)
    assert expand_items(t, 2).view(-1).tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("start", [0, 1, 3])
def test_fk_on_a_one_step_schedule_blames_the_schedule_whatever_start_is(start):
    with pytest.raises(InputError, match="^fk_steering resamples between steps and a schedule of 1 step has no step"):
        SearchSettings(strategy="fk_steering", start=start).validate(1)
