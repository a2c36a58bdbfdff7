"""Inference-time search over sampling paths: N particles per item, steered by rewards of x0 predictions.

A sampler is cut into intervals at the scoring points; between them the caller's ``advance``
function runs its sampler on every particle at once. At a scoring point the x0 prediction of the
step just taken is scored with a reward chain (``RewardSum``: match/avoid/pixel terms, a LOSS, so
the reward is ``r = -loss``) and the strategy acts:

* ``best_of_n``: no action until the end; the particle with the highest final reward wins.
* ``prune``: at each step of ``prune_at`` keep the best ``keep`` share of each item's particles and
  drop the rest, so their remaining steps are never run.
* ``fk_steering`` (Feynman-Kac steering, Singhal et al. 2025): every ``interval`` steps from
  ``start`` on, resample each item's particles (multinomial, with replacement) with weights
  ``softmax(lambda * potential)``. The rewards should describe the states being resampled: an
  advance that looks ahead (``carry``, see ``search``) scores the x0 prediction of the state it
  returns, not the one its last step started from. Potentials: ``difference`` (r_t - r_previous: rewards the
  particles whose score rose), ``value`` (r_t) or ``max`` (the best r seen on the particle's path).
  Resampling copies states; it never re-runs a step, so N particles over S steps cost N x S.

Layout: particle states are one tensor ``[N * B, ...]`` ordered slot-major (row ``s * B + b`` is
slot ``s`` of item ``b``), the order in which ComfyUI repeats a batch's conditioning. Same seed,
same result: every random choice comes from a ``torch.Generator`` seeded from ``seed``, one per item
(``item_seed``), so an item's resampling does not depend on the other items of its batch.

A particle whose x0 prediction is not finite (it diverged: an overflowing fp16 model) scores NaN
(``reward_scorer`` never hands it to the reward models, which refuse non-finite latents) and ranks
last: never picked, pruned first, resampling weight 0; the others score as they would without it.
Only when every particle of an item diverged does the search stop, with an error naming the sampler.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .errors import InputError

STRATEGIES = ("best_of_n", "prune", "fk_steering")
#: Share of the steps after which x0-prediction scores of the current state start to predict the
#: final reward (measured on the mini-world with its default posterior sampler: correlation 0.11 after
#: step 1 of 8, 0.37 after step 2, 0.73 after step 3; docs/search.md). ``auto_start`` turns it into the
#: first FK resampling step.
INFORMATIVE_FROM = 0.25
POTENTIALS = ("difference", "value", "max")


@dataclass(frozen=True)
class SearchSettings:
    """What to search. The FK temperature default (30 per unit of cosine) keeps several lineages per image
    and scored best on the mini-world, with an advance that scores the state it resamples (docs/search.md)."""
    strategy: str = "fk_steering"
    particles: int = 8
    potential: str = "difference"
    temperature: float = 30.0         # lambda: weights are softmax(lambda * potential), per reward unit
    interval: int = 1                 # fk: resample every `interval` steps ...
    start: int = 3                    # ... from step `start` (1 = after the first step) ...
    stop: int | None = None           # ... up to step `stop` (None: the step before the last)
    prune_at: tuple = ()              # prune: steps after which particles are dropped
    keep: float = 0.5                 # prune: share of each item's particles kept at each prune step
    seed: int = 0
    trace: bool = False               # also score the x0 prediction of every step (for the history)

    def validate(self, steps: int) -> "SearchSettings":
        """This settings object if it fits a sampler of ``steps`` steps; InputError naming the bad one."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _int(self.particles, "particles", 1)
        if self.potential not in POTENTIALS:
            raise InputError(f"potential must be one of {POTENTIALS}, got {self.potential!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature (lambda) must be a finite number >= 0, got {self.temperature!r}")
        _int(self.seed, "seed", 0)
        if self.strategy == "fk_steering":
            if steps < 2:
                raise InputError(f"fk_steering resamples between steps and a schedule of {steps} step has no step "
                                 "in between; use strategy best_of_n, or 2 or more steps")
            _int(self.interval, "interval", 1)
            _int(self.start, "start", 1)
            if self.start >= steps or self.interval >= steps:
                raise InputError(f"interval {self.interval} and start {self.start} must be below the sampler's "
                                 f"{steps} steps; resampling after the last step would do nothing")
            if self.stop is not None:
                _int(self.stop, "stop", self.start)
        if self.strategy == "prune":
            if steps < 2:
                raise InputError(f"prune drops particles between steps and a schedule of {steps} step has no step "
                                 "in between; use strategy best_of_n, or 2 or more steps")
            if not (isinstance(self.keep, (int, float)) and 0 < self.keep < 1):
                raise InputError(f"keep must be a share in (0, 1), got {self.keep!r}")
            if not self.prune_at:
                raise InputError("prune_at is empty; expected the steps after which to prune, e.g. (2, 4)")
            for s in self.prune_at:
                _int(s, "prune_at step", 1)
                if s >= steps:
                    raise InputError(f"prune_at step {s} is beyond the sampler's {steps} steps; expected 1 to {steps - 1}")
        return self

    def action_steps(self, steps: int) -> list[int]:
        """Steps (1-based: 'after step s') at which the strategy acts, excluding the final pick."""
        if self.strategy == "fk_steering":
            stop = steps - 1 if self.stop is None else min(self.stop, steps - 1)
            return list(range(self.start, stop + 1, self.interval))
        if self.strategy == "prune":
            return sorted(set(int(s) for s in self.prune_at))
        return []


def auto_start(steps: int) -> int:
    """First resampling step for a sampler of ``steps`` steps: where scores become informative."""
    return min(max(1, steps - 1), max(1, int(INFORMATIVE_FROM * steps)))


def _int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def prune_counts(particles: int, steps: int, prune_at: Sequence[int], keep: float) -> list[int]:
    """Particles alive during each step (index 0 = step 1) under a prune schedule."""
    alive, out = particles, []
    for s in range(1, steps + 1):
        out.append(alive)
        if s in prune_at:
            alive = max(1, math.ceil(alive * keep))
    return out


def particle_steps(settings: SearchSettings, steps: int) -> int:
    """Model-evaluation units per item: particles x steps (pruned particles stop counting)."""
    if settings.strategy == "prune":
        return sum(prune_counts(settings.particles, steps, settings.prune_at, settings.keep))
    return settings.particles * steps


@dataclass
class SearchResult:
    """The best particle per item and the search history (JSON-ready through ``to_dict``)."""
    samples: torch.Tensor                  # [B, ...] final state of each item's best particle
    best_reward: list[float]
    best_slot: list[int]
    particle_steps: int                    # rows x steps actually advanced, all items together (NFE at cfg 1)
    seconds: float
    history: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"best_reward": self.best_reward, "best_slot": self.best_slot, "particle_steps": self.particle_steps,
                "seconds": self.seconds, "history": self.history}


def reward_scorer(reward, batch: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
    """``latents [M] -> (r [M], values)`` with ``r = -loss`` of a ``RewardSum``, slot-major rows.

    Terms with one text (or avoid terms, whose concepts apply to every item) score all rows at
    once; a term with one text per item is evaluated slot by slot, so item ``b``'s text meets row
    ``s * B + b``.
    """
    from .rewards import LatentAvoid, RewardSum, finite_rows, nan_rows, zero_rows
    reward = RewardSum(reward)
    per_item = any(getattr(t, "text_features", None) is not None and t.text_features.shape[0] > 1
                   and not isinstance(t, LatentAvoid) for t in reward.term_list)

    def score(latents: torch.Tensor):
        finite = finite_rows(latents)
        if finite is not None:      # a diverged particle scores NaN (ranks last), the others as they would
            latents = zero_rows(latents, finite)   # a new tensor: the input is kept
        with torch.no_grad():
            if not per_item or latents.shape[0] == batch:
                loss, values = reward.evaluate(latents)
            else:
                parts = [reward.evaluate(latents[i:i + batch]) for i in range(0, latents.shape[0], batch)]
                loss = torch.cat([p[0] for p in parts])
                values = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        if finite is not None:
            loss, values = nan_rows(loss, finite), {k: nan_rows(v, finite) for k, v in values.items()}
        return -loss.detach().float(), values
    return score


def _check_some_finite(x0: torch.Tensor, batch: int, step: int) -> None:
    """InputError naming the sampler when every particle of an item has a non-finite x0 prediction at
    ``step``: that item has nothing left to pick (one diverged particle only scores NaN)."""
    from .rewards import finite_rows
    rows = finite_rows(x0)
    if rows is None:
        return
    finite = rows.view(-1, batch).any(dim=0).cpu()
    if bool(finite.all()):
        return
    bad = [b + 1 for b in torch.nonzero(~finite).flatten().tolist()]
    which = "" if len(bad) == batch else f" of item{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
    raise InputError(f"the sampler's x0 predictions for every particle{which} contain NaN or infinite values at "
                     f"step {step}; expected finite latents: check the model, its dtype and the sampler settings")


def _per_item_rows(values: torch.Tensor, batch: int) -> list[list[float]]:
    """Slot-major [N * B] -> per item, the values of its slots."""
    v = values.detach().float().cpu().view(-1, batch)
    return [[round(float(x), 6) for x in v[:, b]] for b in range(batch)]


def search(advance: Callable, x: torch.Tensor, steps: int, score: Callable, batch: int,
           settings: SearchSettings, callback: Callable | None = None) -> SearchResult:
    """Run a search; ``x`` holds the initial particle states ``[settings.particles * batch, ...]``.

    advance(x, start, end) -> (x_after, x0s): run steps ``start..end-1`` (0-based) on every row of
    ``x``; ``x0s`` is the list of the raw-latent x0 predictions of those steps (the last one is
    scored; all are scored with ``trace``). An advance may also return a third value, ``carry``
    (per-row data ``[rows, ...]`` or None): it follows the rows through pruning and resampling and
    comes back as ``advance(x, start, end, carry=carry)``. That is how an advance *looks ahead*:
    it scores the x0 prediction of the state it returns (one model call on ``x_after``, the call
    the next step needs anyway) and hands that call's output on as ``carry``, so the score
    describes the particle that is resampled, not its parent before the step's fresh noise, and
    the search still costs N x S model calls. score(latents) -> (reward [M], values): higher is
    better (``reward_scorer``). callback(step, best_x0 [B], x) runs after each interval (preview,
    progress, interrupt). The final pick scores the last x0 prediction, which is the sample itself
    for samplers that end on sigma 0.
    """
    settings.validate(steps)
    n = settings.particles
    if not isinstance(x, torch.Tensor) or x.shape[0] != n * batch:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"initial particles must be a tensor with {n} x {batch} rows, got {got}")
    gens = [torch.Generator().manual_seed(item_seed(settings.seed, b)) for b in range(batch)]
    actions = settings.action_steps(steps)
    cuts = sorted(set(actions) | {steps})
    history = {"settings": asdict(settings), "steps": steps, "scored_steps": [], "reward": [], "terms": {},
               "alive": [], "survivors": [], "events": [], "trace": {}, "lookahead": False}
    prev = running_max = None
    slot_ids = torch.arange(n).repeat_interleave(batch).view(n, batch)  # lineage: original slot per row
    done, units, started = 0, 0, time.perf_counter()
    best_x0 = None
    carry = None
    for cut in cuts:
        alive = x.shape[0] // batch
        out = advance(x, done, cut) if carry is None else advance(x, done, cut, carry=carry)
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise InputError(f"advance must return (x, x0s) or (x, x0s, carry), got {type(out).__name__}")
        x, x0s, carry = out if len(out) == 3 else (*out, None)
        if carry is not None and carry.shape[0] != x.shape[0]:
            raise InputError(f"advance returned a carry of {carry.shape[0]} rows for {x.shape[0]} particle rows")
        history["lookahead"] |= carry is not None     # scores describe the states reached, not the steps' starts
        if len(x0s) != cut - done:
            raise InputError(f"advance returned {len(x0s)} x0 predictions for steps {done}..{cut - 1}; expected {cut - done}")
        units += alive * batch * (cut - done)
        if settings.trace:
            for i, x0 in enumerate(x0s[:-1]):
                r, _ = score(x0)
                history["trace"][str(done + i + 1)] = _per_item_rows(r, batch)
        _check_some_finite(x0s[-1], batch, cut)
        r, values = score(x0s[-1])
        if settings.trace:
            history["trace"][str(cut)] = _per_item_rows(r, batch)
        history["scored_steps"].append(cut)
        history["reward"].append(_per_item_rows(r, batch))
        for k, v in values.items():
            history["terms"].setdefault(k, []).append(_per_item_rows(v, batch))
        history["alive"].append(alive)
        history["survivors"].append([len(set(slot_ids[:, b].tolist())) for b in range(batch)])
        grid = r.view(alive, batch)
        rank = _ranked(grid)
        best_x0 = x0s[-1].view(alive, batch, *x0s[-1].shape[1:])[rank.argmax(0), torch.arange(batch)]
        done = cut
        if cut == steps:
            break
        if settings.strategy == "prune":
            k = max(1, math.ceil(alive * settings.keep))
            order = torch.argsort(rank, dim=0, descending=True, stable=True)[:k].cpu()  # [k, B], lineage is on the CPU
            history["events"].append({"step": cut, "kind": "prune", "kept": k, "kept_slots": slot_ids.gather(0, order).T.tolist()})
            x, slot_ids = _gather(x, order, batch), slot_ids.gather(0, order)
            carry = None if carry is None else _gather(carry, order, batch)
        elif settings.strategy == "fk_steering":
            running_max = grid if running_max is None else torch.maximum(running_max, grid)
            potential = {"difference": grid - (prev if prev is not None else torch.zeros_like(grid)),
                         "value": grid, "max": running_max}[settings.potential]
            logw = (settings.temperature * potential).double()
            w = torch.softmax(torch.nan_to_num(logw, nan=-math.inf), dim=0)
            w = torch.where(torch.isfinite(w).all(0, keepdim=True) & (w.sum(0, keepdim=True) > 0), w, torch.full_like(w, 1.0 / alive))
            wt = w.T.cpu()   # [B, alive]; each item draws from its own generator, whatever the batch holds
            ancestors = torch.stack([torch.multinomial(wt[b], alive, replacement=True, generator=gens[b])
                                     for b in range(batch)], dim=1)   # [alive, B]
            ess = (1.0 / (w ** 2).sum(0)).tolist()
            history["events"].append({"step": cut, "kind": "resample", "ancestors": ancestors.T.tolist(),
                                      "ess": [round(e, 3) for e in ess]})
            x = _gather(x, ancestors, batch)
            carry = None if carry is None else _gather(carry, ancestors, batch)
            prev, running_max = grid.gather(0, ancestors.to(grid.device)), running_max.gather(0, ancestors.to(grid.device))
            slot_ids = slot_ids.gather(0, ancestors)
        if callback is not None:
            callback(cut, best_x0, x)
    final = r.view(-1, batch)
    best = _ranked(final).argmax(0)
    alive = final.shape[0]
    samples = x.view(alive, batch, *x.shape[1:])[best.to(x.device), torch.arange(batch, device=x.device)]
    history["best_slot"] = slot_ids[best.cpu(), torch.arange(batch)].tolist()
    history["particle_steps"] = units
    if callback is not None:
        callback(steps, best_x0, x)
    return SearchResult(samples=samples, best_reward=[float(final[best[b], b]) for b in range(batch)],
                        best_slot=history["best_slot"], particle_steps=units,
                        seconds=time.perf_counter() - started, history=history)


def item_seed(seed: int, item: int) -> int:
    """Seed of item ``item``'s resampling generator: ``seed`` itself for item 0 (so a batch of one
    draws what it always drew), a splitmix64 mix of (seed, item) for the others."""
    if item == 0:
        return int(seed)
    z = (int(seed) + item * 0x9E3779B97F4A7C15) % 2 ** 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return z ^ (z >> 31)


def _ranked(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards to rank particles by: NaN (an overflowed decode, a diverged particle) ranks last, as
    resampling gives it weight 0 (argmax and a descending sort would put it first)."""
    return torch.nan_to_num(rewards, nan=-math.inf)


def _gather(x: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Slot-major ``x`` [N * B, ...] -> rows[k, b] of each item, slot-major [K * B, ...]."""
    flat = (rows.to(x.device) * batch + torch.arange(batch, device=x.device)).reshape(-1)
    return x.index_select(0, flat)


def expand_items(t: torch.Tensor, particles: int) -> torch.Tensor:
    """``[B, ...]`` -> slot-major ``[particles * B, ...]`` (each slot a copy of the batch)."""
    return t.repeat(particles, *[1] * (t.ndim - 1))
