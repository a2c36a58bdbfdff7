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
* Resampling copies particle states between intervals, so only samplers that can be cut at any
  step without changing what they compute are steered (fk_steering, prune): single-step samplers.
  Multistep samplers (dpmpp_2m, deis, uni_pc, ...) and samplers that read the whole schedule
  (heunpp2, dpm_fast, dpm_adaptive) are refused there with one sentence; best_of_n runs them uncut.
  Deterministic samplers (euler, heun) never separate copied particles again: FK then only reweights.
* The inner sampler's noise: particle 0 draws exactly what the plain sampler draws (ComfyUI's
  default noise sampler seeded with the run's seed, or its Brownian tree over the whole schedule),
  continued across intervals; particle s has its own stream, so chunking never changes the result
  and one particle is exactly the plain sampler (tests/comfy/test_search_samplers.py).
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
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise InputError(f"{name} must be step numbers >= 1 separated by commas (e.g. '2, 4'), got {text!r}")
        out.append(int(part))
    return tuple(sorted(set(out)))


def _row_seed(seed: int, start: int, row: int) -> int:
    return (int(seed) * 1_000_003 + start * 8_191 + row * 131_071 + 17) % _SEED_MOD


#: KSamplerSelect's samplers that cannot be cut at scoring points without changing what they compute
#: (docs/search.md, "Samplers"): each step of a multistep sampler uses its past predictions (a restart
#: drops them, and a resampled particle would continue another particle's history); the others read
#: the whole schedule (heunpp2: its first and last sigma; dpm_fast and dpm_adaptive: their own steps
#: between the first and last sigma). best_of_n runs them uncut.
MULTISTEP_SAMPLERS = frozenset((
    "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "sa_solver", "sa_solver_pece", "uni_pc", "uni_pc_bh2"))
WHOLE_SCHEDULE_SAMPLERS = frozenset(("heunpp2", "dpm_fast", "dpm_adaptive"))
#: Samplers that choose their own steps: their callback does not report one x0 per given step.
OWN_STEP_SAMPLERS = frozenset(("dpm_fast", "dpm_adaptive"))
_FUNCTION_NAMES = {"dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive",
                   "sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2"}


def sampler_name(inner) -> str:
    """KSamplerSelect's name of a KSAMPLER (ddim is euler with random inpainting noise)."""
    fn = getattr(inner, "sampler_function", None)
    name = getattr(fn, "__name__", type(inner).__name__)
    name = _FUNCTION_NAMES.get(name, name[len("sample_"):] if name.startswith("sample_") else name)
    return "ddim" if name == "euler" and getattr(inner, "inpaint_options", {}).get("random", False) else name


def check_inner_sampler(inner, strategy: str) -> str:
    """The inner sampler's name if ``strategy`` can run it; otherwise one sentence naming it and what to pick."""
    if not isinstance(inner, comfy.samplers.KSAMPLER):
        raise InputError(f"sampler must be a KSAMPLER (e.g. from KSamplerSelect) whose steps can be run "
                         f"interval by interval, got {type(inner).__name__}")
    name = sampler_name(inner)
    if strategy == "best_of_n":
        return name
    if name in MULTISTEP_SAMPLERS:
        why = "is a multistep sampler (each step uses its past predictions, which cutting it at scoring points drops)"
    elif name in WHOLE_SCHEDULE_SAMPLERS:
        why = "reads the whole schedule (its steps change when it is cut at scoring points)"
    else:
        return name
    raise InputError(f"sampler {name} {why}, so {strategy} cannot steer it; pick a single-step sampler such as "
                     f"euler_ancestral, dpmpp_sde, dpmpp_2s_ancestral or lcm, or strategy best_of_n")


#: KSamplerSelect's samplers whose default noise is a Brownian tree over the whole schedule (on the CPU,
#: or on the sampler's device for the _gpu ones); the others that take a noise_sampler use ComfyUI's
#: default noise sampler. Other packs' samplers are read from their source.
BROWNIAN_SAMPLERS = {"dpmpp_sde": "brownian", "dpmpp_2m_sde": "brownian", "dpmpp_2m_sde_heun": "brownian",
                     "dpmpp_3m_sde": "brownian", "dpmpp_sde_gpu": "brownian_gpu", "dpmpp_2m_sde_gpu": "brownian_gpu",
                     "dpmpp_2m_sde_heun_gpu": "brownian_gpu", "dpmpp_3m_sde_gpu": "brownian_gpu"}


def _noise_kind(fn, name: str):
    """How the inner sampler draws its noise: None (it takes no noise_sampler), 'gaussian' (ComfyUI's
    default noise sampler) or 'brownian' / 'brownian_gpu' (a Brownian tree over the whole schedule)."""
    if "noise_sampler" not in inspect.signature(fn).parameters:
        return None
    if name in BROWNIAN_SAMPLERS:
        return BROWNIAN_SAMPLERS[name]
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return "gaussian"
    if "BrownianTreeNoiseSampler" not in source:
        return "gaussian"
    return "brownian_gpu" if "cpu=False" in source else "brownian"


class _ParticleNoise:
    """The inner sampler's noise, one stream per particle position, for the whole run.

    Position 0 draws exactly what the plain sampler draws (ComfyUI's default noise sampler seeded with
    the run's seed, or its Brownian tree over the whole schedule), continued across scoring intervals;
    position s > 0 has its own stream, so results do not depend on chunking. Each stream draws a
    batch of B items, as the plain sampler does.
    """

    def __init__(self, kind, template, sigmas, seed: int):
        self.kind, self.template, self.sigmas, self.seed = kind, template, sigmas, int(seed)
        self.streams = {}

    def _stream(self, position: int):
        if position not in self.streams:
            seed = self.seed if position == 0 else _row_seed(self.seed, -2, position)
            x = self.template
            if self.kind == "gaussian":
                g = torch.Generator(device=x.device).manual_seed(seed)
                self.streams[position] = lambda s, s_next, g=g: torch.randn(x.size(), dtype=x.dtype, layout=x.layout,
                                                                           device=x.device, generator=g)
            else:
                positive = self.sigmas[self.sigmas > 0]
                self.streams[position] = BrownianTreeNoiseSampler(x, positive.min(), self.sigmas.max(), seed=seed,
                                                                  cpu=self.kind == "brownian")
        return self.streams[position]

    def sampler_for(self, positions):
        """The noise_sampler for a chunk of particle positions (slot-major rows)."""
        if self.kind is None:
            return None
        streams = [self._stream(p) for p in positions]
        return lambda sigma, sigma_next: torch.cat([s(sigma, sigma_next) for s in streams])


class _LookaheadRecord:
    """What FK's lookahead call produced, so that the call it stands in for can be answered in full.

    A sampler may add post-CFG hooks (the CFG++ samplers record ``uncond_denoised`` there); the
    lookahead call runs the hooks of the sampler's last interval with a recorder in front of them.
    When the next interval's first call asks for the same state and sigma with the same options
    (the same base hooks plus as many hooks of its own), its hooks are called with the recorded
    arguments and the stored prediction is returned; otherwise the model runs (counted as a miss).
    Per-row tensors travel with the particles as FK's carry: ``[rows, 4, ...]`` = the prediction,
    the prediction before the sampler's hooks, ``cond_denoised``, ``uncond_denoised``.
    """

    def __init__(self, base_options: dict):
        self.base_options = base_options
        self.base_hooks = list(base_options.get("sampler_post_cfg_function", []))
        self.shared = None         # the recorded non-row arguments (cond, uncond, cond_scale, model)
        self.options = None        # the model options of the lookahead call, without the recorder
        self.extra_hooks = 0

    def _split(self, options: dict):
        hooks = list(options.get("sampler_post_cfg_function", []))
        k = len(self.base_hooks)
        if len(hooks) < k or any(a is not b for a, b in zip(hooks, self.base_hooks)):
            return None
        rest = {key: value for key, value in options.items() if key != "sampler_post_cfg_function"}
        return rest, hooks[k:]

    def call(self, model_k, x, sigma, extra_args: dict) -> torch.Tensor:
        """Make the model call on ``x`` at ``sigma`` with the options the sampler used; returns the carry rows."""
        options = extra_args.get("model_options", {})
        split = self._split(options)
        recorded = {}

        def recorder(args):
            recorded.update(args)
            return args["denoised"]
        if split is None:     # options changed beyond added hooks: record nothing, never replay
            out = model_k(x, sigma, **extra_args)
            self.options = None
            return torch.stack([out, out, out, out], 1)
        rest, extra = split
        look = dict(options)
        look["sampler_post_cfg_function"] = self.base_hooks + [recorder] + extra
        out = model_k(x, sigma, **{**extra_args, "model_options": look})
        self.options, self.extra_hooks = rest, len(extra)
        self.shared = {k: v for k, v in recorded.items() if k in ("cond", "uncond", "cond_scale", "model")}
        rows = [recorded.get(k) for k in ("denoised", "cond_denoised", "uncond_denoised")]
        rows = [r if isinstance(r, torch.Tensor) and r.shape == out.shape else torch.zeros_like(out) for r in rows]
        return torch.stack([out, *rows], 1)

    def replay(self, x, sigma, options: dict, carry: torch.Tensor):
        """The prediction for a call on the recorded state, its hooks run; None where it cannot be replayed."""
        if self.options is None:
            return None
        split = self._split(options)
        if split is None:
            return None
        rest, extra = split
        if len(extra) != self.extra_hooks or rest.keys() != self.options.keys() or \
                any(rest[k] is not self.options[k] for k in rest):
            return None
        denoised = carry[:, 1]
        for fn in extra:
            args = {**self.shared, "denoised": denoised, "cond_denoised": carry[:, 2], "uncond_denoised": carry[:, 3],
                    "sigma": sigma, "model_options": options, "input": x}
            denoised = fn(args)
        return carry[:, 0]


class _CountingModel(comfy.samplers.KSamplerX0Inpaint):
    """KSamplerX0Inpaint that counts rows evaluated (NFE) and checks for interrupts on every call.

    ``pending = (sigma, x, carry, record)``: FK's lookahead call at the last scoring point, gathered
    with the particles; the first call asking for exactly that sigma and state is answered from it
    (``_LookaheadRecord.replay``). Any other call runs the model.
    """

    def __init__(self, model_wrap, sigmas):
        super().__init__(model_wrap, sigmas)
        self.evaluated, self.misses, self.pending = 0, 0, None

    def __call__(self, x, sigma, *args, **kwargs):
        interrupt_check()
        pending, self.pending = self.pending, None
        if pending is not None:
            p_sigma, p_x, carry, record = pending
            if x.shape == p_x.shape and float(sigma.flatten()[0]) == p_sigma and torch.equal(x, p_x):
                out = record.replay(x, sigma, kwargs.get("model_options", {}), carry)
                if out is not None:
                    return out
            self.misses += 1
        self.evaluated += x.shape[0]
        return super().__call__(x, sigma, *args, **kwargs)


class _ParticleRun:
    """One search run of an inner KSAMPLER on particles: start them, run an interval, look ahead, score.

    ``advance`` is what ``latentclip.search.search`` calls between scoring points.
    """

    def __init__(self, owner: "SearchSampler", settings, name, model_wrap, sigmas, extra_args, callback, noise,
                 latent_image, denoise_mask):
        self.owner, self.settings, self.name = owner, settings, name
        self.model_wrap, self.sigmas, self.extra_args, self.callback = model_wrap, sigmas, extra_args, callback
        self.base = model_wrap.inner_model
        self.steps = len(sigmas) - 1
        self.batch = noise.shape[0]
        self.denoise_mask = denoise_mask
        self.fn, self.options = owner.inner.sampler_function, dict(owner.inner.extra_options)
        self.seed = int(extra_args.get("seed", 0) or 0)
        terms, _ = build_reward(owner.reward, self.base, self.batch)
        self.raw_score = reward_scorer(terms, self.batch)
        self.lookahead = settings.strategy == "fk_steering"
        self.own_steps = name in OWN_STEP_SAMPLERS
        self.record = _LookaheadRecord(extra_args.get("model_options", {}))
        self.progress = {"units": 0, "preview": None, "nfe": 0, "misses": 0}
        self.total_units = particle_steps(settings, self.steps)
        self.start_particles(noise, latent_image)

    # -- start particles ---------------------------------------------------------------------------------
    def start_particles(self, noise, latent_image):
        """Slot 0 starts from SamplerCustom's noise; slot s from noise seeded by (seed, s), unless the
        noise is all zeros (add_noise off): then every particle starts from the given latent."""
        n, batch = self.settings.particles, self.batch
        fresh = bool(torch.any(noise != 0))
        slots = [noise] + [torch.randn(noise.shape, generator=torch.Generator().manual_seed(_row_seed(self.seed, -1, s))).to(noise)
                           if fresh else noise for s in range(1, n)]
        self.noise_p = torch.cat(slots)
        self.latent_p = expand_items(latent_image if latent_image is not None else torch.zeros_like(noise), n)
        if self.owner.inner.inpaint_options.get("random", False):    # ddim: KSAMPLER's inpainting noise
            g = torch.manual_seed(self.seed + 1)
            self.inpaint_noise = torch.randn(noise.shape, generator=g, device="cpu").to(noise)
        else:
            self.inpaint_noise = noise
        max_denoise = self.owner.max_denoise(self.model_wrap, self.sigmas)
        self.x = self.base.model_sampling.noise_scaling(self.sigmas[0], self.noise_p, self.latent_p, max_denoise)
        self.noise = _ParticleNoise(_noise_kind(self.fn, self.name), self.x[:batch], self.sigmas, self.seed)

    # -- score -------------------------------------------------------------------------------------------
    def score(self, denoised):
        """Rewards of x0 predictions (scaled space), scored in raw latent space."""
        return self.raw_score(self.base.process_latent_out(denoised.float()))

    # -- run an interval ---------------------------------------------------------------------------------
    def advance(self, x, start, end, carry=None):
        """Run steps start..end-1 on every particle; with lookahead, score (and hand on) the x0 of the state reached.

        The x0 list scored for the final step is the sample itself when the schedule ends at sigma 0,
        so the best reward is the returned sample's reward.
        """
        batch = self.batch
        alive = x.shape[0] // batch
        per = self.owner._slots_per_chunk(self.base, x.shape, batch, alive)
        look = self.lookahead and end < self.steps
        outs, x0s, ahead = [], [[] for _ in range(end - start)], []
        for c0 in range(0, alive, per):
            rows = slice(c0 * batch, min(alive, c0 + per) * batch)
            out, preds, look_rows = self._run_chunk(x[rows], start, end, range(c0, min(alive, c0 + per)),
                                                    None if carry is None else carry[rows], look)
            outs.append(out)
            if look_rows is not None:
                ahead.append(look_rows)
            for i, d in enumerate(preds):
                x0s[i].append(d)
        x0s = [torch.cat(p) for p in x0s]
        return (torch.cat(outs), x0s, torch.cat(ahead)) if look else (torch.cat(outs), x0s)

    def _run_chunk(self, xc, start, end, positions, carry, look):
        batch = self.batch
        k = xc.shape[0] // batch
        sub = self.sigmas[start:end + 1].clone()      # some samplers write into their sigmas (uni_pc)
        model_k = _CountingModel(self.model_wrap, self.sigmas)
        model_k.latent_image = expand_items(self.latent_p[:batch], k)
        model_k.noise = expand_items(self.inpaint_noise, k)
        ea = dict(self.extra_args)
        ea["denoise_mask"] = self._chunk_mask(k)
        if carry is not None:
            model_k.pending = (float(self.sigmas[start]), xc, carry, self.record)
        seen = {}
        cb = self._step_callback(xc.shape[0])

        def capture(d):
            seen[d["i"]] = d["denoised"]
            cb(d)
        kw = dict(self.options)
        noise_sampler = self.noise.sampler_for(positions)
        if noise_sampler is not None:
            kw["noise_sampler"] = noise_sampler
        out = self.fn(model_k, xc, sub, extra_args=ea, callback=capture, disable=True, **kw)
        look_rows = None
        if look:   # the next step's model call on the state reached, made now to score that state
            look_rows = self.record.call(model_k, out, self.sigmas[end].to(out) * out.new_ones([out.shape[0]]), ea)
        self.progress["nfe"] += model_k.evaluated
        self.progress["misses"] += model_k.misses
        return out, self._x0_list(seen, start, end, out, look_rows), look_rows

    def _x0_list(self, seen, start, end, out, look_rows):
        """The x0 predictions to score for steps start..end-1: FK's describe the state after each step
        (the next step's call, then the lookahead), the others the state each step started from; after
        the final step of a schedule that ends at sigma 0, the sample itself."""
        final = self.base.model_sampling.inverse_noise_scaling(self.sigmas[-1], out) \
            if end == self.steps and float(self.sigmas[-1]) == 0 else None
        if self.own_steps:       # its callback counts its own steps; only the sample is scored
            return [final if final is not None else out] * (end - start)
        missing = [i for i in range(end - start) if i not in seen]
        if missing:
            raise InputError(f"sampler {self.name} did not report its x0 predictions through the callback; "
                             "choose another sampler (euler, euler_ancestral, dpmpp_2m, ...)")
        preds = [seen[i] for i in range(end - start)]
        if self.lookahead:
            preds = preds[1:] + [look_rows[:, 0] if look_rows is not None else preds[-1]]
        if final is not None:
            preds[-1] = final
        return preds

    def _chunk_mask(self, k):
        """An inpainting mask per item repeats with the particles; a shared one stays as it is."""
        mask = self.denoise_mask
        if mask is None or mask.shape[0] != self.batch:
            return mask
        return expand_items(mask, k)

    def _step_callback(self, rows):
        progress, settings, batch, callback = self.progress, self.settings, self.batch, self.callback

        def cb(d):
            interrupt_check()
            progress["units"] += rows / batch
            if progress["preview"] is None or settings.strategy == "best_of_n":
                progress["preview"] = d["denoised"][:batch]
            if callback is not None:
                callback(min(int(progress["units"]), self.total_units) - 1, progress["preview"], d["x"][:batch],
                         self.total_units)
        return cb

    def on_scored(self, step, best_x0, x):
        interrupt_check()
        self.progress["preview"] = best_x0  # x0 predictions are in the sampler's scaled space


class SearchSampler(comfy.samplers.Sampler):
    """A SAMPLER: runs ``inner`` (a KSAMPLER) on particles and returns each item's best one."""

    #: runs remembered for the history node (one Search Sampler may feed several SamplerCustom nodes)
    KEEP_RUNS = 8

    def __init__(self, reward, inner, settings: SearchSettings, max_batch: int = 0):
        self.reward, self.inner, self.settings, self.max_batch = tuple(reward), inner, settings, int(max_batch)
        self.last_result = None
        self.last_summary = None
        self.runs = []          # [(raw-latent output as SamplerCustom returns it, summary)], newest last

    def _slots_per_chunk(self, base, shape, batch: int, alive: int) -> int:
        if self.max_batch > 0:
            return max(1, min(alive, self.max_batch // batch or 1))
        device = mm.get_torch_device()
        per_slot = base.memory_required([2 * batch, *shape[1:]])  # 2: cond and uncond rows at cfg > 1
        free = mm.get_free_memory(device)
        return max(1, min(alive, int(0.8 * free // max(per_slot, 1))))

    def _settings_for(self, steps: int, name: str) -> SearchSettings:
        settings = self.settings
        if steps < 1:
            raise InputError("sigmas must hold at least two values (one step); got a schedule of 0 steps")
        if settings.strategy == "fk_steering" and settings.start == 0 and steps > 1:
            settings = dataclasses.replace(settings, start=auto_start(steps))
        if name in OWN_STEP_SAMPLERS and settings.trace:   # it has no per-step x0 at the given steps
            settings = dataclasses.replace(settings, trace=False)
        return settings.validate(steps)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        name = check_inner_sampler(self.inner, self.settings.strategy)
        settings = self._settings_for(len(sigmas) - 1, name)
        base = model_wrap.inner_model
        check_reno_latent(latent_image if latent_image is not None else noise, base, self.reward, "latent_image")
        check_reno_latent(noise, base, self.reward, "noise")
        if not torch.isfinite(sigmas).all():
            raise InputError("sigmas contains NaN or infinite values; expected a finite schedule (e.g. from BasicScheduler)")
        run = _ParticleRun(self, settings, name, model_wrap, sigmas, extra_args, callback, noise, latent_image,
                           denoise_mask)
        result = search(run.advance, run.x, run.steps, run.score, run.batch, settings, callback=run.on_scored)
        samples = base.model_sampling.inverse_noise_scaling(sigmas[-1], result.samples).to(noise.dtype)
        if callback is not None:  # the final preview/denoised output is the winner
            callback(run.total_units - 1, samples, samples, run.total_units)
        nfe = run.progress["nfe"]
        self.last_result = result
        self.last_summary = {**result.to_dict(), "nfe_rows": nfe, "nfe_per_item": nfe / run.batch, "sampler": name,
                             "batch": run.batch, "lookahead_misses": run.progress["misses"],
                             "history_dropped_at": result.history["scored_steps"][:-1]}
        returned = base.process_latent_out(samples.to(torch.float32)).to(mm.intermediate_device())
        self.runs = (self.runs + [(returned.detach().cpu(), self.last_summary)])[-self.KEEP_RUNS:]
        return samples

    def summary_for(self, samples: torch.Tensor) -> dict:
        """The summary of the run that returned ``samples`` (SamplerCustom's LATENT); InputError if none did."""
        if not self.runs:
            raise InputError("the Search Sampler has not run yet; connect the LATENT its SamplerCustom produced")
        s = samples.detach().float().cpu() if isinstance(samples, torch.Tensor) else None
        for returned, summary in reversed(self.runs):
            if s is not None and s.shape == returned.shape and torch.equal(s, returned):
                return summary
        raise InputError(f"samples is not a LATENT that this Search Sampler returned (it remembers its last "
                         f"{len(self.runs)} runs); connect the output of the SamplerCustom it sampled with")


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
                                     "stochastic one (euler_ancestral, dpmpp_sde, lcm) lets resampled copies diverge. "
                                     "prune and fk_steering take single-step samplers only (not dpmpp_2m, uni_pc, ...)"),
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
                    io.Boolean.Input("score_every_step", default=True, optional=True,
                                     tooltip="Record every particle's reward at every step for the history (one reward "
                                             "evaluation per step: cheap with a Latent-CLIP, a VAE decode with a pixel reward)")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, reward, sampler, particles, strategy, potential, temperature, interval, start, prune_steps,
                keep, seed, max_batch=0, score_every_step=False) -> io.NodeOutput:
        # score_every_step came after the first release: a saved graph without it keeps that release's
        # behaviour (scores at scoring points only); a new node's widget defaults to on.
        prune_at = parse_steps(prune_steps) if strategy == "prune" else ()
        settings = SearchSettings(strategy, int(particles), potential, float(temperature), int(interval), int(start),
                                  None, prune_at, float(keep), int(seed) % _SEED_MOD, bool(score_every_step))
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(particles, bool) or int(particles) < 1:
            raise InputError(f"particles must be an integer >= 1, got {particles!r}")
        check_inner_sampler(sampler, strategy)
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
        summary = sampler.summary_for(samples.get("samples") if isinstance(samples, dict) else None)
        plot = _image_tensor(plot_search_history(summary["history"]))
        h = summary["history"]
        text = (f"{h['settings']['strategy']}: {h['settings']['particles']} particles, {summary['nfe_per_item']:.0f} "
                f"model rows per image; best reward " + ", ".join(f"{r:.4f}" for r in summary["best_reward"]))
        return io.NodeOutput(json.dumps(summary), plot, ui=ui.PreviewText(text))


NODES = [LatentCLIPSearchSampler, LatentCLIPSearchHistory]
