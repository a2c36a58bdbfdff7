"""Inference-time search nodes: a SAMPLER that runs another SAMPLER on N particles per item and steers
them with Latent-CLIP (or pixel) rewards of their x0 predictions; a node that reports its history.

How an inner ComfyUI sampler runs on a particle batch (``latentclip.search`` does the strategy):

* Particles are one batch ``[N * B, ...]`` ordered slot-major, the order in which ComfyUI repeats
  a batch's conditioning, so each particle meets its own item's prompt; slot 0 starts from the
  noise SamplerCustom made, slot s from noise seeded by (seed, s).
* Between scoring points the inner KSAMPLER's ``sampler_function`` runs on ``sigmas[a:b+1]`` for
  chunks of particles that fit free memory; a callback captures every step's ``denoised`` (x0),
  which is scored in raw latent space (``process_latent_out``) with the reward chain.
* FK steering scores the state it resamples: after an interval one more model call predicts the
  x0 of the state reached (the call the next step needs; its output is gathered with the particles
  and handed to that step, so the search still costs N x S calls). Scoring the last step's own x0
  would judge each particle before that step's fresh noise, one step stale.
* Resampling copies particle states between intervals. A multistep sampler (dpmpp_2m, deis, ...)
  restarts at every interval, so its history is dropped there and the first step after a
  scoring point is first-order, as at the start of sampling (no history of the wrong ancestor is
  ever used). Deterministic samplers (euler, dpmpp_2m) never separate copied particles again:
  FK steering then only reweights; use a stochastic sampler (euler_ancestral, dpmpp_sde, lcm).
* Stochastic samplers get per-particle noise (a seeded Gaussian per row, or a per-row Brownian
  tree for the SDE samplers that use one), so chunking never changes the result.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import torch
import comfy.model_management as mm
import comfy.samplers
from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler
from comfy_api.latest import io, ui

from latentclip.errors import InputError
from latentclip.plotting import plot_search_history
from latentclip.search import STRATEGIES, POTENTIALS, SearchSettings, auto_start, expand_items, particle_steps, reward_scorer, search

from .comfy_bridge import interrupt_check
from .reno import LatentRewardType, _image_tensor, build_reward, check_reno_latent

CATEGORY = "latent_clip/search"
_SEED_MOD = 2 ** 63 - 1


def parse_steps(text: str, name: str = "prune_steps") -> tuple:
    """'2, 4' -> (2, 4); InputError naming the input otherwise."""
    out = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise InputError(f"{name} must be step numbers >= 1 separated by commas (e.g. '2, 4'), got {text!r}")
        out.append(int(part))
    return tuple(sorted(set(out)))


def _row_seed(seed: int, start: int, row: int) -> int:
    return (int(seed) * 1_000_003 + start * 8_191 + row * 131_071 + 17) % _SEED_MOD


def _uses_brownian_tree(fn) -> bool:
    try:
        return "BrownianTreeNoiseSampler" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


class _CountingModel(comfy.samplers.KSamplerX0Inpaint):
    """KSamplerX0Inpaint that counts rows evaluated (NFE) and checks for interrupts on every call.

    ``cached = (sigma, x, denoised)``: the output of a call already made (FK's lookahead at the last
    scoring point, gathered with the particles); the first call with exactly that sigma and x gets
    it back instead of a second model evaluation. Any other call runs the model.
    """
    evaluated = 0
    cached = None

    def __call__(self, x, sigma, *args, **kwargs):
        interrupt_check()
        hit, self.cached = self.cached, None
        if hit is not None and x.shape == hit[1].shape and float(sigma.flatten()[0]) == hit[0] and torch.equal(x, hit[1]):
            return hit[2]
        self.evaluated += x.shape[0]
        return super().__call__(x, sigma, *args, **kwargs)


class SearchSampler(comfy.samplers.Sampler):
    """A SAMPLER: runs ``inner`` (a KSAMPLER) on particles and returns each item's best one."""

    def __init__(self, reward, inner, settings: SearchSettings, max_batch: int = 0):
        self.reward, self.inner, self.settings, self.max_batch = tuple(reward), inner, settings, int(max_batch)
        self.last_result = None
        self.last_summary = None

    def _slots_per_chunk(self, base, shape, batch: int, alive: int) -> int:
        if self.max_batch > 0:
            return max(1, min(alive, self.max_batch // batch or 1))
        device = mm.get_torch_device()
        per_slot = base.memory_required([2 * batch, *shape[1:]])  # 2: cond and uncond rows at cfg > 1
        free = mm.get_free_memory(device)
        return max(1, min(alive, int(0.8 * free // max(per_slot, 1))))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        inner = self.inner
        if not isinstance(inner, comfy.samplers.KSAMPLER):
            raise InputError(f"sampler must be a KSAMPLER (e.g. from KSamplerSelect) whose steps can be run "
                             f"interval by interval, got {type(inner).__name__}")
        steps = len(sigmas) - 1
        settings = self.settings
        if steps < 1:
            raise InputError("sigmas must hold at least two values (one step); got a schedule of 0 steps")
        if settings.strategy == "fk_steering" and settings.start == 0:
            settings = dataclasses.replace(settings, start=auto_start(steps))
        settings.validate(steps)
        base = model_wrap.inner_model
        ms = base.model_sampling
        batch = noise.shape[0]
        check_reno_latent(noise, base, self.reward, "noise")
        terms, _ = build_reward(self.reward, base, batch)
        raw_score = reward_scorer(terms, batch)
        n = settings.particles
        seed = int(extra_args.get("seed", 0) or 0)

        def score(denoised):
            return raw_score(base.process_latent_out(denoised.float()))

        slots = [noise]
        for s in range(1, n):
            g = torch.Generator().manual_seed(_row_seed(seed, -1, s))
            slots.append(torch.randn(noise.shape, generator=g).to(noise))
        noise_p = torch.cat(slots)
        latent_p = expand_items(latent_image if latent_image is not None else torch.zeros_like(noise), n)
        max_denoise = self.max_denoise(model_wrap, sigmas)
        x = ms.noise_scaling(sigmas[0], noise_p, latent_p, max_denoise)

        def chunk_mask(k):
            """An inpainting mask per item repeats with the particles; a shared one stays as it is."""
            if denoise_mask is None or denoise_mask.shape[0] != batch:
                return denoise_mask
            return expand_items(denoise_mask, k)

        fn, options = inner.sampler_function, dict(inner.extra_options)
        takes_noise = "noise_sampler" in inspect.signature(fn).parameters
        brownian = takes_noise and _uses_brownian_tree(fn)
        total_units = particle_steps(settings, steps)
        progress = {"units": 0, "preview": None, "nfe": 0}

        def step_callback(rows):
            def cb(d):
                interrupt_check()
                progress["units"] += rows / batch
                if progress["preview"] is None or settings.strategy == "best_of_n":
                    progress["preview"] = d["denoised"][:batch]
                if callback is not None:
                    callback(min(int(progress["units"]), total_units) - 1, progress["preview"], d["x"][:batch], total_units)
            return cb

        lookahead = settings.strategy == "fk_steering"

        def advance(x, start, end, carry=None):
            """Run steps start..end-1; with lookahead, score (and hand on) the x0 of the state reached."""
            sub = sigmas[start:end + 1]
            alive = x.shape[0] // batch
            per = self._slots_per_chunk(base, x.shape, batch, alive)
            look = lookahead and end < steps
            outs, x0s, ahead = [], [[] for _ in range(end - start)], []
            for c0 in range(0, alive, per):
                rows = slice(c0 * batch, min(alive, c0 + per) * batch)
                xc = x[rows]
                k = xc.shape[0] // batch
                model_k = _CountingModel(model_wrap, sigmas)
                model_k.latent_image = expand_items(latent_p[:batch], k)
                model_k.noise = expand_items(noise_p[:batch], k)
                ea = dict(extra_args)
                ea["denoise_mask"] = chunk_mask(k)
                ea["seed"] = _row_seed(seed, start, c0)
                if carry is not None:
                    model_k.cached = (float(sigmas[start]), xc, carry[rows])
                seen = {}
                cb = step_callback(xc.shape[0])

                def capture(d, seen=seen, cb=cb):
                    seen[d["i"]] = d["denoised"]
                    cb(d)
                kw = dict(options)
                if takes_noise:
                    row_seeds = [_row_seed(seed, start, r) for r in range(rows.start, rows.stop)]
                    if brownian:
                        positive = sub[sub > 0]
                        kw["noise_sampler"] = BrownianTreeNoiseSampler(xc, positive.min(), sub.max(), seed=row_seeds, cpu=True)
                    else:
                        kw["noise_sampler"] = _per_row_gaussian(xc, row_seeds)
                out = fn(model_k, xc, sub, extra_args=ea, callback=capture, disable=True, **kw)
                missing = [i for i in range(end - start) if i not in seen]
                if missing:
                    raise InputError(f"sampler {getattr(fn, '__name__', fn)} did not report its x0 predictions "
                                     "through the callback; choose another sampler (euler, euler_ancestral, dpmpp_2m, ...)")
                outs.append(out)
                if look:   # the next step's model call on the state reached, made now to score that state
                    ahead.append(model_k(out, sigmas[end].to(out) * out.new_ones([out.shape[0]]), **ea))
                progress["nfe"] += model_k.evaluated
                preds = [seen[i] for i in range(end - start)]
                if lookahead:   # x0 of the state after each step: the next step's call, then the lookahead
                    preds = preds[1:] + [ahead[-1] if look else preds[-1]]   # (after the final step: the sample)
                for i, d in enumerate(preds):
                    x0s[i].append(d)
            x0s = [torch.cat(p) for p in x0s]
            return (torch.cat(outs), x0s, torch.cat(ahead)) if look else (torch.cat(outs), x0s)

        def on_scored(step, best_x0, x):
            interrupt_check()
            progress["preview"] = best_x0  # x0 predictions are in the sampler's scaled space

        result = search(advance, x, steps, score, batch, settings, callback=on_scored)
        samples = ms.inverse_noise_scaling(sigmas[-1], result.samples)
        if callback is not None:  # the final preview/denoised output is the winner
            callback(total_units - 1, samples, samples, total_units)
        self.last_result = result
        self.last_summary = {**result.to_dict(), "nfe_rows": progress["nfe"], "nfe_per_item": progress["nfe"] / batch,
                             "sampler": getattr(fn, "__name__", str(fn)), "batch": batch,
                             "history_dropped_at": result.history["scored_steps"][:-1]}
        return samples.to(noise.dtype)


def _per_row_gaussian(x, row_seeds):
    """A noise sampler drawing each row's noise from its own seeded generator (chunking-independent)."""
    gens = [torch.Generator().manual_seed(s) for s in row_seeds]

    def sample(sigma, sigma_next):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(device=x.device, dtype=x.dtype)
    return sample


class LatentCLIPSearchSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPSearchSampler", display_name="Search Sampler (Latent-CLIP, FK steering)", category=CATEGORY,
            description="A SAMPLER for SamplerCustom/SamplerCustomAdvanced: runs the connected sampler on N particles per "
                        "image and steers them with the reward of their x0 predictions (no decode with a Latent-CLIP "
                        "reward). Returns each image's best particle. Costs about N x steps model evaluations.",
            inputs=[LatentRewardType.Input("reward", tooltip="Latent-CLIP Reward / Pixel-CLIP Reward chain"),
                    io.Sampler.Input("sampler", tooltip="The stepping between scoring points, e.g. KSamplerSelect; a "
                                     "stochastic one (euler_ancestral, dpmpp_sde, lcm) lets resampled copies diverge"),
                    io.Int.Input("particles", default=4, min=1, max=256),
                    io.Combo.Input("strategy", options=list(STRATEGIES), default="fk_steering",
                                   tooltip="best_of_n: score finished particles; prune: drop the worst at prune_steps; "
                                           "fk_steering: resample by the reward potential every interval steps"),
                    io.Combo.Input("potential", options=list(POTENTIALS), default="difference",
                                   tooltip="fk: difference (reward gain since the last resampling), value, or max"),
                    io.Float.Input("temperature", default=30.0, min=0.0, max=10000.0, step=1.0,
                                   tooltip="fk lambda: weights softmax(lambda * potential); the potential is the reward "
                                           "in loss units (1 - cos for a match term of weight 0.01 on a CLIP with logit scale 100)"),
                    io.Int.Input("interval", default=1, min=1, max=1000, tooltip="fk: resample every k steps"),
                    io.Int.Input("start", default=0, min=0, max=1000,
                                 tooltip="fk: first resampling after this step; 0 = auto, 1/4 of the steps (earlier x0 "
                                         "predictions barely predict the result)"),
                    io.String.Input("prune_steps", default="2, 4", tooltip="prune: steps after which particles are dropped"),
                    io.Float.Input("keep", default=0.5, min=0.01, max=0.99, step=0.01, tooltip="prune: share kept each time"),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, tooltip="Seeds resampling"),
                    io.Int.Input("max_batch", default=0, min=0, max=4096,
                                 tooltip="Most particle rows per model call; 0 = as many as free memory allows"),
                    io.Boolean.Input("score_every_step", default=True,
                                     tooltip="Record every particle's reward at every step for the history (one reward "
                                             "evaluation per step: cheap with a Latent-CLIP, a VAE decode with a pixel reward)")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, reward, sampler, particles, strategy, potential, temperature, interval, start, prune_steps,
                keep, seed, max_batch=0, score_every_step=True) -> io.NodeOutput:
        prune_at = parse_steps(prune_steps) if strategy == "prune" else ()
        settings = SearchSettings(strategy, int(particles), potential, float(temperature), int(interval), int(start),
                                  None, prune_at, float(keep), int(seed) % _SEED_MOD, bool(score_every_step))
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(particles, bool) or int(particles) < 1:
            raise InputError(f"particles must be an integer >= 1, got {particles!r}")
        return io.NodeOutput(SearchSampler(reward, sampler, settings, max_batch))


class LatentCLIPSearchHistory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPSearchHistory", display_name="Search History (Latent-CLIP)", category=CATEGORY,
            description="The last run of a Search Sampler: rewards per scoring step, survivors, resampling events "
                        "(JSON) and a plot. Connect the sampler and the sampled LATENT (so it runs after sampling).",
            inputs=[io.Sampler.Input("sampler"), io.Latent.Input("samples", tooltip="SamplerCustom's output")],
            outputs=[io.String.Output(display_name="history"), io.Image.Output(display_name="plot")])

    @classmethod
    def execute(cls, sampler, samples) -> io.NodeOutput:
        if not isinstance(sampler, SearchSampler):
            raise InputError(f"sampler must come from a Search Sampler (Latent-CLIP) node, got {type(sampler).__name__}")
        if sampler.last_summary is None:
            raise InputError("the Search Sampler has not run yet; connect the LATENT its SamplerCustom produced")
        summary = sampler.last_summary
        plot = _image_tensor(plot_search_history(summary["history"]))
        h = summary["history"]
        text = (f"{h['settings']['strategy']}: {h['settings']['particles']} particles, {summary['nfe_per_item']:.0f} "
                f"model rows per image; best reward " + ", ".join(f"{r:.4f}" for r in summary["best_reward"]))
        return io.NodeOutput(json.dumps(summary), plot, ui=ui.PreviewText(text))


NODES = [LatentCLIPSearchSampler, LatentCLIPSearchHistory]
