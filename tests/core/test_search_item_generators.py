"""FK steering resamples each item with its own generator: an item's result does not depend on the batch it is in
(review r4 D5: one generator shared by the batch gave item 0 other ancestors in a batch of 3 than alone)."""
import pytest
import torch

from latentclip.search import SearchSettings, item_seed, search

torch.set_num_threads(1)
STEPS = 6


def deterministic_process():
    """Every row moves by a fixed function of its own state and the step (as euler does); x0 prediction = x."""
    def advance(x, start, end):
        x0s = []
        for i in range(start, end):
            x = x + torch.sin(3.0 * x + i) * 0.7 + 0.1 * (i + 1)
            x0s.append(x.clone())
        return x, x0s
    return advance


def score(x):
    v = x.view(x.shape[0], -1).mean(1)
    return v, {"value": v}


def initial(particles, batch):
    """Slot s of item b starts at the same state whatever the batch size: [N * B, 1] slot-major."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(particles, 8, generator=g)            # up to 8 items
    return table[:, :batch].reshape(particles * batch, 1).clone()


@pytest.mark.parametrize("strategy, kw", [
    ("fk_steering", dict(potential="difference", temperature=3.0, interval=1, start=1)),
    ("fk_steering", dict(potential="value", temperature=1.0, interval=2, start=1, seed=12345)),
    ("best_of_n", {}),
    ("prune", dict(prune_at=(2, 4), keep=0.5)),
])
def test_item_0_of_a_batch_of_3_is_the_item_alone(strategy, kw):
    n = 4
    settings = SearchSettings(strategy, n, **kw)
    alone = search(deterministic_process(), initial(n, 1), STEPS, score, 1, settings)
    in_batch = search(deterministic_process(), initial(n, 3), STEPS, score, 3, settings)
    assert torch.allclose(in_batch.samples[:1], alone.samples, atol=1e-5)
    assert in_batch.best_slot[0] == alone.best_slot[0]
    for a, b in zip(alone.history["events"], in_batch.history["events"]):
        key = "ancestors" if a["kind"] == "resample" else "kept_slots"
        assert b[key][0] == a[key][0]


def test_fk_items_draw_from_different_streams_and_seed_0_item_0_keeps_its_seed():
    assert item_seed(7, 0) == 7                        # a batch of one draws what it drew before the change
    seeds = {item_seed(s, b) for s in range(4) for b in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2 ** 64 for x in seeds)
    # two items with identical particles and rewards still resample independently
    n, batch = 6, 2
    x = torch.zeros(n * batch, 1)
    x[: n * batch: batch] = torch.arange(n, dtype=torch.float32).view(n, 1) * 0.1   # item 0
    x[1: n * batch: batch] = torch.arange(n, dtype=torch.float32).view(n, 1) * 0.1  # item 1, the same
    res = search(deterministic_process(), x, STEPS, score, batch,
                 SearchSettings("fk_steering", n, temperature=0.5, interval=1, start=1))
    anc = [e["ancestors"] for e in res.history["events"]]
    assert any(a[0] != a[1] for a in anc)
