"""How an inner ComfyUI sampler runs on particles for the Search Sampler (``nodes.search``); the
strategy itself is ``latentclip.search``. Read ``ParticleRun`` first: start particles, run an
interval, look ahead, score.

* Before the first model call the reward models are loaded in one list with the UNet that sampling loaded, with a
  request for the search's working memory (``load_with_unet``): a load of them alone could offload the UNet.
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

import inspect
import math

import torch
import comfy.model_management as mm
import comfy.sampler_helpers
import comfy.samplers
from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler

from latentclip.errors import InputError
from latentclip.search import expand_items, particle_steps, reward_scorer

from .comfy_bridge import interrupt_check
from .reno import PixelTermSpec, build_reward, pixel_handles, reward_patchers, sampling_patchers

_SEED_MOD = 2 ** 63 - 1


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
WHOLE_SCHEDULE_SAMPLERS = frozenset(("heunpp2", "dpm_fast", "dpm_adaptive", "lcm_upscale"))   # lcm_upscale: its
# upscale steps come from the length of the sigmas it is given, so each interval would upscale again
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


# -- memory --------------------------------------------------------------------------------------------------
def vit_activation_bytes(visual, rows: int) -> int:
    """Bytes an open_clip ViT image tower holds at once in a forward pass without gradients, for ``rows`` inputs:
    one residual block's activations (per token 6 x its width and 2 x its MLP's width, in the tower's dtype) and
    two attention maps of heads x tokens^2 (which an attention kernel may never materialise). 0 for a tower of
    another kind (its scoring is left to ComfyUI's minimum inference memory)."""
    try:
        block = visual.transformer.resblocks[0]
        width, heads, hidden = visual.transformer.width, block.attn.num_heads, block.mlp.c_fc.out_features
        tokens = math.prod(visual.grid_size) + 1
        size = block.mlp.c_fc.weight.element_size()
    except (AttributeError, IndexError, TypeError):
        return 0
    return int(rows * size * (tokens * (6 * width + 2 * hidden) + 2 * heads * tokens ** 2))


def scoring_memory(specs, pixels: dict, shape, particles: int) -> int:
    """Bytes scoring holds at once for latents of ``shape`` ([B, ...], one slot of particles): the largest term's
    (terms are evaluated in turn). A pixel term decodes whole slots, as many as free memory holds (``_score_rows``),
    so one slot's decode (ComfyUI's ``memory_used_decode``, as VAE Decode asks) and its pixel CLIP's forward; then
    every term scores one slot at a time. Without one, a Latent-CLIP term scores every particle in one forward
    (the raw latents copied in float32 and its image tower's activations)."""
    batch, latent = shape[0], math.prod(shape[1:])
    rows = batch if any(isinstance(s, PixelTermSpec) for s in specs) else particles * batch
    need = 0
    for spec in specs:
        if isinstance(spec, PixelTermSpec):
            decode = getattr(spec.vae, "memory_used_decode", None)
            n = batch * decode([1, *shape[1:]], spec.vae.vae_dtype) if decode is not None else 0
            clip = pixels[(spec.clip_name, spec.model_name)].patcher.model
            n += vit_activation_bytes(getattr(clip, "visual", None), batch)
        elif getattr(spec, "handle", None) is not None:       # Latent-CLIP and head terms
            visual = getattr(getattr(spec.handle.patcher.model, "clip", None), "visual", None)
            n = rows * latent * 4 + vit_activation_bytes(visual, rows)
        else:
            n = 0
        need = max(need, n)
    return int(need)


def unet_working_memory(model_wrap, shape) -> tuple[int, int]:
    """(memory_required, minimum_memory_required) that sampling asked for when it loaded the UNet
    (``comfy.sampler_helpers.prepare_sampling``: the batch with and without its uncond rows, plus the ControlNets'
    inference memory). The search's model calls run in slots of that batch, at least one at a time; a smaller
    request would let the UNet take memory that sampling left free for them."""
    patcher = model_wrap.model_patcher
    conds = getattr(model_wrap, "conds", None) or {}
    _, control = comfy.sampler_helpers.get_additional_models(conds, patcher.model_dtype())
    required, minimum = comfy.sampler_helpers.estimate_memory(patcher, list(shape), conds)
    return int(required + control), int(minimum + control)


def load_with_unet(model_wrap, specs, pixels: dict, shape, particles: int) -> tuple[int, int]:
    """Load the reward models in ONE list with the patchers sampling loaded (the UNet, its ControlNets), asking for
    the search's working memory: the larger of the UNet's one-slot request and scoring's (the two never run at
    once). Model management then keeps the UNet, counts the reward models and offloads other models to make room;
    a load of the reward models alone (mid-sampling) could offload the UNet, and nothing would load it back.
    Returns the request."""
    score = scoring_memory(specs, pixels, shape, particles)
    required, minimum = unet_working_memory(model_wrap, shape)
    request = (max(required, score), max(minimum, score))
    mm.load_models_gpu([*sampling_patchers(model_wrap), *reward_patchers(specs, pixels)], memory_required=request[0],
                       minimum_memory_required=request[1])
    return request


class ParticleRun:
    """One search run of an inner KSAMPLER on particles: start them, run an interval, look ahead, score.

    ``advance`` is what ``latentclip.search.search`` calls between scoring points.
    """

    def __init__(self, owner, settings, name, model_wrap, sigmas, extra_args, callback, noise,
                 latent_image, denoise_mask):
        self.owner, self.settings, self.name = owner, settings, name
        self.model_wrap, self.sigmas, self.extra_args, self.callback = model_wrap, sigmas, extra_args, callback
        self.base = model_wrap.inner_model
        self.steps = len(sigmas) - 1
        self.batch = noise.shape[0]
        self.denoise_mask = denoise_mask
        self.fn, self.options = owner.inner.sampler_function, dict(owner.inner.extra_options)
        self.seed = int(extra_args.get("seed", 0) or 0)
        pixels = pixel_handles(owner.reward)
        self.memory_request = load_with_unet(model_wrap, owner.reward, pixels, noise.shape, settings.particles)
        terms, _ = build_reward(owner.reward, self.base, self.batch, pixels, loaded=True)
        self.raw_score = reward_scorer(terms, self.batch)
        self.pixel_vaes = [spec.vae for spec in owner.reward if isinstance(spec, PixelTermSpec)]
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
        """Rewards of x0 predictions (scaled space), scored in raw latent space. A pixel term decodes them:
        as many particles at a time as the VAE's decode fits in free memory (as VAE Decode batches) and
        ``max_batch`` allows, not every particle in one decode."""
        raw = self.base.process_latent_out(denoised.float())
        rows = self._score_rows(raw)
        if rows >= raw.shape[0]:
            return self.raw_score(raw)
        parts = [self.raw_score(raw[i:i + rows]) for i in range(0, raw.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}

    def _score_rows(self, raw):
        if not self.pixel_vaes:
            return raw.shape[0]
        slots = raw.shape[0] // self.batch
        if self.owner.max_batch > 0:
            slots = min(slots, self.owner.max_batch // self.batch or 1)
        for vae in self.pixel_vaes:
            need = getattr(vae, "memory_used_decode", None)
            if need is None:
                slots = 1
                continue
            per_slot = self.batch * need([1, *raw.shape[1:]], vae.vae_dtype)
            slots = min(slots, int(mm.get_free_memory(vae.device) // max(per_slot, 1)))
        return max(1, slots) * self.batch

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
        if out.shape != xc.shape and (start, end) != (0, len(self.sigmas) - 1):   # uncut (best_of_n) is fine
            raise InputError(f"sampler changes the latent's size ({list(xc.shape)} to {list(out.shape)}), so the search "
                             "cannot run it interval by interval; use it with strategy best_of_n, or another sampler")
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
