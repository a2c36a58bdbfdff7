"""Search-mini: inference-time search (``latentclip.search``) on the mini generator, judged by GenEval-mini.

The generator is sampled with a stochastic rectified-flow sampler (below: DDPM's posterior step,
written for x_t = (1-t) x0 + t eps) so that particles that share a state after resampling diverge
again. Runs, on the same prompts and seeds:

* ``baseline``: one particle;
* ``best_of_n``: N particles, the best final Latent-CLIP reward wins;
* ``prune``: more particles at the start, the worse half dropped twice, at the same NFE per image;
* ``fk_latent``: FK steering on Latent-CLIP rewards of the x0 predictions, N particles;
* ``fk_pixel``: the same with the pixel reward (decode x0 with the mini VAE, pixel CLIP).

All but the baseline cost the same model evaluations per image (``nfe_per_image``). Rewards are
match terms weighted by ``1 / logit_scale``, so ``r = cos`` up to a constant and the temperature
lambda is per unit of cosine. ``informative_steps`` measures how early x0-prediction scores can be
trusted: for each step, the judge's success of the particle that step's reward would pick.
Safety: FK with an ``avoid`` term (and the anchors safety-mini uses) against the baseline.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import judge as J
from ..errors import InputError
from ..rewards import LatentAvoid, LatentMatch, PixelCLIPMatch
from ..search import SearchSettings, expand_items, particle_steps, prune_counts, reward_scorer, search

RUNS = ("baseline", "best_of_n", "prune", "fk_latent", "fk_pixel")
#: Sampling: steps and stochasticity eta (0 = deterministic Euler/DDIM, 1 = DDPM's posterior noise).
STEPS, ETA = 8, 1.0
#: How the noise is injected: "posterior" (DDPM/DDIM-eta: the noise the forward process would put
#: between t' and t) or "fresh" (x' = (1-t') x0 + t' (sqrt(1-eta^2) eps + eta xi): more noise than
#: the posterior at every step; the first sampler measured, docs/search.md).
NOISE = "posterior"
NOISES = ("posterior", "fresh")
#: FK defaults (measured, docs/search.md): difference potential, lambda 30 per cosine, every step from
#: step 2 of 8, scoring each particle's current state (lookahead); earlier scores barely predict the
#: result, larger lambdas collapse lineages, smaller ones resample at random.
FK = {"potential": "difference", "temperature": 30.0, "interval": 1, "start": 2, "stop": None}
#: Prune at equal NFE: after these shares of the steps (3 and 5 of 8: scores are informative from
#: step 3, docs/search.md), keep half each time; the start count fills the NFE budget.
PRUNE = {"prune_at": (0.375, 0.625), "keep": 0.5}


def prune_steps(steps: int) -> tuple:
    return tuple(sorted({min(steps - 1, max(1, int(f * steps))) for f in PRUNE["prune_at"]}))


def noise_scale(t: float, tn: float, eta: float, noise: str = NOISE) -> float:
    """Std of the fresh noise xi in the step t -> t' (x' = (1-t') x0 + sqrt(t'^2 - s^2) eps + s xi).

    "posterior": s = eta x DDPM's posterior std, t' sqrt(1 - ((1-t) t' / ((1-t') t))^2) (the step is
    then DDIM with eta; from t = 1 it is all fresh noise). "fresh": s = eta t'.
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if tn <= 0:
        return 0.0
    if noise == "fresh":
        return min(1.0, eta) * tn
    return min(1.0, eta) * tn * math.sqrt(max(0.0, 1 - ((1 - t) * tn / ((1 - tn) * t)) ** 2))


def stochastic_advance(generator, cond, batch: int, steps: int = STEPS, eta: float = ETA, seed: int = 0,
                       noise: str = NOISE, lookahead: bool = False):
    """``advance(x, start, end)`` for ``latentclip.search``: rectified-flow steps on slot-major particles.

    x_t = (1-t) x0 + t eps; the net predicts v = eps - x0, so x0 = x - t v and eps = x + (1-t) v.
    Step t -> t': x' = (1-t') x0 + sqrt(t'^2 - s^2) eps + s xi with s = ``noise_scale`` and xi fresh
    Gaussian noise (one generator per run, seeded, so runs repeat; each row draws its own, so copies
    made by resampling diverge). Returns raw-latent x0 predictions per step.

    ``lookahead``: the x0 reported for a step is the prediction of the state *after* it (the model
    call the next step makes, done at once and handed on as the search's ``carry``, so the next
    interval starts without calling the model again). Without it, the x0 is the step's own
    prediction, made before the step's fresh noise: one step stale for the state that is resampled.
    """
    noise_scale(1.0, 0.5, eta, noise)      # reject an unknown noise before sampling
    ts = torch.linspace(1.0, 0.0, steps + 1)
    gen = torch.Generator().manual_seed(seed)
    c, u = cond

    def advance(x, start, end, carry=None):
        rows = x.shape[0] // batch
        cc = tuple(expand_items(t, rows) for t in c)
        x0s, v = [], carry
        with torch.no_grad():
            for i in range(start, end):
                t, tn = ts[i], ts[i + 1]
                if v is None:
                    v = generator.velocity(x, t.view(1), cc)
                x0 = x - t * v
                eps = x + (1 - t) * v
                if not lookahead:
                    x0s.append(generator.to_raw(x0))
                if tn == 0:
                    x, v = x0, None
                    if lookahead:
                        x0s.append(generator.to_raw(x0))
                    continue
                xi = torch.randn(x.shape, generator=gen)
                sd = noise_scale(float(t), float(tn), eta, noise)
                x = (1 - tn) * x0 + math.sqrt(max(0.0, float(tn) ** 2 - sd ** 2)) * eps + sd * xi
                v = None
                if lookahead:            # the next step's model call, made now to score the new state
                    v = generator.velocity(x, tn.view(1), cc)
                    x0s.append(generator.to_raw(x - tn * v))
        return (x, x0s, v) if lookahead else (x, x0s)
    return advance


def particle_noise(seeds, particles: int, channels: int = 4) -> torch.Tensor:
    """Slot-major initial noises: slot 0 of an item is ``noise_for(seed)``, slot s its own seeded draw."""
    from .generator import noise_for
    rows = [noise_for(seeds, channels=channels)]
    for s in range(1, particles):
        rows.append(noise_for([int(sd) * 1000 + 7919 * s for sd in seeds], channels=channels))
    return torch.cat(rows)


def match_terms(world, kind: str, prompts):
    if kind == "latent":
        s = float(world.latent_clip.logit_scale.exp())
        return [LatentMatch(world.latent_clip, prompts, weight=1.0 / s)]
    s = float(world.pixel_clip.logit_scale.exp())
    return [PixelCLIPMatch(world.pixel_clip.clip, world.vae.decode, prompts, weight=1.0 / s,
                           tokenizer=world.pixel_clip.tokenizer, image_range="0,1", image_size=64)]


def settings_for(run: str, particles: int, steps: int, seed: int = 0, fk: dict | None = None, trace=False):
    """The ``SearchSettings`` of a run; prune starts with as many particles as the NFE budget allows."""
    if run in ("baseline", "best_of_n"):
        return SearchSettings("best_of_n", 1 if run == "baseline" else particles, seed=seed, trace=trace)
    if run == "prune":
        budget, n, at = particles * steps, particles, prune_steps(steps)
        while sum(prune_counts(n + 1, steps, at, PRUNE["keep"])) <= budget:
            n += 1
        return SearchSettings("prune", n, seed=seed, trace=trace, prune_at=at, keep=PRUNE["keep"])
    return SearchSettings("fk_steering", particles, seed=seed, trace=trace, **{**FK, **(fk or {})})


def run_batch(world, run: str, prompts, seeds, particles: int, steps: int = STEPS, eta: float = ETA,
              fk: dict | None = None, extra_terms=(), trace=False, seed: int = 0, noise: str = NOISE,
              lookahead: bool = True):
    """One run on a batch of (prompt, seed) items: the SearchResult, ``samples`` as raw latents.

    ``lookahead`` (FK only): score the state being resampled; False scores the x0 its last step
    started from (one step stale; the comparison in docs/search.md)."""
    batch = len(prompts)
    st = settings_for(run, particles, steps, seed, fk, trace)
    kind = "pixel" if run == "fk_pixel" else "latent"
    score = reward_scorer(match_terms(world, kind, prompts) + list(extra_terms), batch)
    with torch.no_grad():
        cond = world.generator.prepare(prompts, batch)
    advance = stochastic_advance(world.generator, cond, batch, steps, eta, seed, noise,
                                 lookahead=lookahead and st.strategy == "fk_steering")
    x = particle_noise(seeds, st.particles, world.generator.latent_channels)
    res = search(advance, x, steps, score, batch, st)
    res.samples = world.generator.to_raw(res.samples)   # the sampler's state is standardised; rewards saw raw x0
    return res


def evaluate(world, prompts, seeds=(0, 1, 2, 3), particles: int = 8, steps: int = STEPS, eta: float = ETA,
             runs=RUNS, batch: int = 67, fk: dict | None = None, log=print, noise: str = NOISE,
             lookahead: bool = True) -> dict:
    """GenEval-mini per run: ``{run: {overall, categories..., seconds_per_image, nfe_per_image}}``."""
    from .geneval import decode, success, summarize
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise InputError(f"unknown run {unknown[0]!r}; expected some of {RUNS}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be an integer >= 1 (items sampled together), got {batch!r}")
    items = [(c, p, int(s)) for c, p in prompts for s in seeds]
    out = {}
    for run in runs:
        lat, seconds, nfe = [], 0.0, 0
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            t0 = time.perf_counter()
            res = run_batch(world, run, [p for _, p, _ in chunk], [s for _, _, s in chunk], particles, steps, eta, fk,
                            noise=noise, lookahead=lookahead)
            seconds += time.perf_counter() - t0
            lat.append(res.samples)
            nfe += res.particle_steps
        images = decode(world, torch.cat(lat))
        ok = [success(c, J.check(img, p)) for img, (c, p, _) in zip(images, items)]
        out[run] = summarize(items, ok, seconds)
        out[run]["nfe_per_image"] = nfe / len(items)
        log(f"search {run}: overall {100 * out[run]['overall']:.1f}% ({out[run]['seconds_per_image']:.4f} s/image, "
            f"{out[run]['nfe_per_image']:.0f} NFE/image)")
    return out


def informative_steps(world, prompts, seeds=(0, 1, 2, 3), particles: int = 8, steps: int = STEPS, eta: float = ETA,
                      batch: int = 67, noise: str = NOISE, kind: str = "latent") -> dict:
    """Per step s: the judge's success of the particle picked by the reward after step s.

    The reward is that of the x0 prediction of the state after step s (the lookahead FK scores):
    ``kind`` "latent" (Latent-CLIP) or "pixel" (decode + pixel CLIP), so two verifiers can be
    compared on the same particles.

    One best-of-N pass with ``trace`` (no steering), so every particle's final image is judged;
    ``random`` is the mean success (a pick without information), ``final`` the pick by the last step.
    """
    from .geneval import decode, success
    items = [(c, p, int(s)) for c, p in prompts for s in seeds]
    picks = {s: [] for s in range(1, steps + 1)}
    mean_ok, corr = [], {s: [] for s in range(1, steps + 1)}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        b = len(chunk)
        ps, sd = [p for _, p, _ in chunk], [s for _, _, s in chunk]
        st = SearchSettings("best_of_n", particles, trace=True)
        score = reward_scorer(match_terms(world, kind, ps), b)
        with torch.no_grad():
            cond = world.generator.prepare(ps, b)
        # keep every particle's final state: a no-op advance wrapper records it
        finals = {}
        adv = stochastic_advance(world.generator, cond, b, steps, eta, 0, noise, lookahead=True)

        def advance(x, start, end, carry=None):
            x, x0s, carry = adv(x, start, end, carry)
            finals["x"] = x0s[-1]
            return x, x0s, carry
        res = search(advance, particle_noise(sd, particles, world.generator.latent_channels), steps, score, b, st)
        images = decode(world, finals["x"])
        ok = np.array([success(chunk[r % b][0], J.check(img, chunk[r % b][1])) for r, img in enumerate(images)],
                      dtype=float).reshape(particles, b)
        mean_ok.append(ok.mean(0))
        final_r = np.array(res.history["trace"][str(steps)]).T            # [N, B]
        for s in range(1, steps + 1):
            r = np.array(res.history["trace"][str(s)]).T
            picks[s].append(ok[r.argmax(0), np.arange(b)])
            for j in range(b):
                if np.std(r[:, j]) > 0 and np.std(final_r[:, j]) > 0:
                    corr[s].append(np.corrcoef(r[:, j], final_r[:, j])[0, 1])
    return {"random": float(np.concatenate(mean_ok).mean()),
            "pick_success": {s: float(np.concatenate(v).mean()) for s, v in picks.items()},
            "corr_with_final_reward": {s: float(np.mean(v)) for s, v in corr.items()}}


def safety(world, particles: int = 8, steps: int = STEPS, eta: float = ETA, fk: dict | None = None,
           noise: str = NOISE) -> dict:
    """Concept rate of safety-mini's prompts: baseline vs FK with match + avoid (+ anchors) rewards."""
    from . import safety_mini as SM
    items = [(p, s) for p in SM.PROMPTS for s in SM.SEEDS]
    ps, sd = [p for p, _ in items], [s for _, s in items]
    s = float(world.latent_clip.logit_scale.exp())
    terms = [LatentAvoid(world.latent_clip, list(SM.CONCEPT_TEXTS), weight=1.0 / s)]
    terms += [LatentMatch(world.latent_clip, [t], weight=0.5 / s / len(SM.ANCHOR_TEXTS), name="anchor")
              for t in SM.ANCHOR_TEXTS]
    out = {}
    for run, extra in (("baseline", ()), ("fk_avoid", terms)):
        t0 = time.perf_counter()
        res = run_batch(world, run, ps, sd, particles, steps, eta, fk, extra_terms=extra, noise=noise)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            images = world.vae.decode(res.samples)
        concept = [SM.concept_present(img) for img in images]
        ok = [J.check(img, p)["ok"] for img, p in zip(images, ps)]
        out[run] = {"concept_rate": float(np.mean(concept)), "prompt_success": float(np.mean(ok)),
                    "seconds_per_image": seconds / len(items), "nfe_per_image": res.particle_steps / len(items)}
    if out["baseline"]["concept_rate"] > 0:
        out["fk_avoid"]["concept_rate_cut"] = 1 - out["fk_avoid"]["concept_rate"] / out["baseline"]["concept_rate"]
    return out


def format_table(search_result: dict) -> str:
    lines = [f"{'run':<12}{'overall %':>10}{'s/image':>10}{'NFE/image':>11}"]
    for run in RUNS:
        if run in search_result:
            r = search_result[run]
            lines.append(f"{run:<12}{100 * r['overall']:>10.1f}{r['seconds_per_image']:>10.4f}{r['nfe_per_image']:>11.0f}")
    return "\n".join(lines)
