"""Safety guidance as a MODEL patch, and a node that reports what it did on the last sampling run.

``LatentCLIPSafetyGuidance`` adds a post-CFG hook to a clone of the MODEL: at every model call
inside the start/end window it converts the CFG-combined x0 prediction from the sampler's scaled
space to raw VAE latents, takes one ``latentclip.safety_guidance`` step away from the concepts,
and converts back. Any standard sampler (KSampler, SamplerCustom, any step count) runs it.

The hook writes per-step statistics to a bounded ``GuidanceRecord`` attached to the hook
function itself (functions survive ModelPatcher clones and model_options copies by reference),
so ``LatentCLIPGuidanceReport`` finds every guidance patch on a MODEL, chained ones included.
An OUTER_SAMPLE wrapper opens a new run record when sampling starts and stores a fingerprint of
the run's output, so the report can tell which run produced the LATENT it is given.
"""
from __future__ import annotations

import collections
import hashlib
import itertools

import torch
import comfy.model_sampling
import comfy.patcher_extension
from comfy_api.latest import io, ui

from latentclip.errors import InputError
from latentclip.guidance import DEFAULT_MAX_MOVE, safety_guidance

from .comfy_bridge import check_vae_family, text_lines
from .loaders import LatentCLIPType

CATEGORY = "latent_clip"
DEFAULT_SCALE = 0.05          # fraction of the latent's norm moved per step at high noise (untuned; docs/safety.md)
CONCEPT_TEMPLATE = "an image of {}"
NEGATION_TEMPLATE = "an image of no {}"   # the safety filter's contrast, as the authors' prototype
MAX_RUNS = 4                  # runs kept per patch (the report picks the one that made its LATENT)
MAX_STEPS = 1000              # model calls kept per run; later calls are counted, not stored
PATCH_KEY = "latent_clip_safety"
_patch_ids = itertools.count(1)


def fingerprint(samples: torch.Tensor) -> str:
    """A short hash of a latent batch's exact values, to match a LATENT with the run that made it."""
    t = samples.detach().float().cpu().contiguous()
    digest = hashlib.blake2b(t.numpy().tobytes(), digest_size=12).hexdigest()
    return f"{list(t.shape)}:{digest}"


class GuidanceRecord:
    """What one guidance patch did on its last few sampling runs (bounded, plain Python values)."""

    def __init__(self, patch_id: int, concepts: list[str], anchors: list[str], settings: dict):
        self.patch_id, self.concepts, self.anchors, self.settings = patch_id, concepts, anchors, settings
        self.runs: collections.deque = collections.deque(maxlen=MAX_RUNS)
        self._counter = itertools.count(1)
        self.model = None

    def model_for_run(self, handle):
        """The Latent-CLIP for this sampling run: made ready when sampling loaded its models
        (``make_prepare_wrapper``), before the first model call; loaded here only for a sampler that
        skips ComfyUI's preparation."""
        if self.model is None:
            self.model = handle.load_for_grad()
            self.current()["loads"] += 1
        return self.model

    def prepare_for_run(self, handle, unet_patcher) -> None:
        """Once per run, as sampling loads its models: the Latent-CLIP loaded with the UNet, ready for grad."""
        self.model = handle.load_for_grad_with(unet_patcher)
        self.current()["loads"] += 1

    def finish_sampling(self) -> None:
        self.model = None   # hold no reference between runs: ComfyUI may offload or free it

    def start_run(self, sigmas=None) -> dict:
        steps = None if sigmas is None else len(sigmas) - 1
        run = {"run": next(self._counter), "sampler_steps": steps, "calls": 0, "in_window": 0,
               "steps": [], "dropped": 0, "fingerprint": None, "loads": 0}
        self.runs.append(run)
        self.model = None   # the run's Latent-CLIP, loaded at its first guided call
        return run

    def current(self) -> dict:
        return self.runs[-1] if self.runs else self.start_run()

    def add_call(self, sigma: float, stats=None) -> None:
        run = self.current()
        run["calls"] += 1
        if stats is None:
            return
        run["in_window"] += 1
        if len(run["steps"]) >= MAX_STEPS:
            run["dropped"] += 1
            return
        run["steps"].append({"sigma": sigma, "fired": stats.fired, "relative_move": stats.relative_move,
                             "prob_before": stats.prob_before, "prob_after": stats.prob_after,
                             "cos_before": stats.concept_cos_before, "cos_after": stats.concept_cos_after})

    def finish_run(self, output) -> None:
        if self.runs and isinstance(output, torch.Tensor):
            self.runs[-1]["fingerprint"] = fingerprint(output)

    def find_run(self, samples: torch.Tensor | None) -> tuple[dict | None, bool]:
        """The run whose output is ``samples`` (exact match), else the latest run; and whether it matched."""
        if samples is not None and self.runs:
            fp = fingerprint(samples)
            for run in reversed(self.runs):
                if run["fingerprint"] == fp:
                    return run, True
        return (self.runs[-1] if self.runs else None), False

    def summary(self, run: dict) -> list[dict]:
        """Per item: guided calls, and concept probability/cosine before the first and after the last guided call."""
        steps = run["steps"]
        if not steps:
            return []
        out = []
        for i in range(len(steps[0]["fired"])):
            fired = [s for s in steps if i < len(s["fired"]) and s["fired"][i]]
            first, last = (fired[0], fired[-1]) if fired else (steps[0], steps[-1])
            out.append({"item": i, "fired": len(fired), "measured": len(steps),
                        "prob_before": _at(first, "prob_before", i), "prob_after": _at(last, "prob_after", i),
                        "cos_before": _at(first, "cos_before", i), "cos_after": _at(last, "cos_after", i),
                        "max_relative_move": max((s["relative_move"][i] for s in fired), default=0.0)})
        return out

    def report(self, samples: torch.Tensor | None = None) -> str:
        s = self.settings
        run, matched = self.find_run(samples)
        sigma_start, sigma_end = (run or {}).get("window") or (s["sigma_start"], s["sigma_end"])
        head = (f"Latent-CLIP safety guidance #{self.patch_id}: concepts {', '.join(self.concepts)}; "
                f"anchors {', '.join(self.anchors) if self.anchors else '(none)'}; scale {s['scale']}, "
                f"window {s['start_percent']:.2f}-{s['end_percent']:.2f} (sigma {_sig(sigma_start)} to {_sig(sigma_end)}), "
                f"threshold {s['threshold']}")
        if run is None:
            return head + "\n  no sampling run recorded yet"
        lines = [head, f"  run {run['run']}" + ("" if matched else
                 " (latest run; the given samples are not this patch's sampler output)") +
                 f": {run['calls']} model calls, {run['in_window']} in the window"
                 + (f", {run['dropped']} not stored" if run["dropped"] else "")]
        for r in self.summary(run):
            lines.append(f"  item {r['item']}: guided {r['fired']}/{r['measured']} calls; "
                         f"P(concept) {_f(r['prob_before'])} -> {_f(r['prob_after'])}; "
                         f"cos {_f(r['cos_before'])} -> {_f(r['cos_after'])}; "
                         f"largest step {100 * r['max_relative_move']:.1f}% of the latent norm")
        return "\n".join(lines)


def _at(step: dict, key: str, i: int):
    values = step.get(key)
    return None if values is None or i >= len(values) else values[i]


def _sig(v: float) -> str:
    return "max" if v >= 1e8 else f"{v:.3g}"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def records_of(model) -> list[GuidanceRecord]:
    """Every guidance record on a MODEL's post-CFG hooks, in hook order."""
    hooks = model.model_options.get("sampler_post_cfg_function", [])
    return [fn.latent_clip_record for fn in hooks if isinstance(getattr(fn, "latent_clip_record", None), GuidanceRecord)]


def sampling_window(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of the start/end percents on ``model_sampling``."""
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))


def make_hook(handle, record: GuidanceRecord, concepts: list[str], anchors: list[str], scale: float,
              start_percent: float, end_percent: float, threshold: float, max_move: float = DEFAULT_MAX_MOVE):
    """The post-CFG function: one guidance step on the raw-space x0 while sigma is in the window.

    The window is resolved per run on the sampled model's own model_sampling, as ComfyUI resolves
    ControlNet and timestep-range percents: a ModelSampling* node applied after this patch (shift, zsnr,
    a flow schedule) changes which sigmas the percents mean."""
    concept_prompts = [CONCEPT_TEMPLATE.format(c) for c in concepts]
    # Alternatives only enter the concept probability (threshold and report), never the direction.
    alt_prompts = anchors if anchors else [NEGATION_TEMPLATE.format(c) for c in concepts]
    embeds: dict = {}

    def text_embeds(lc):
        key = (str(lc.device), lc.dtype)
        if key not in embeds:
            with torch.inference_mode(False), torch.no_grad():
                c = lc.encode_text(concept_prompts).float()
                a = lc.encode_text(anchors).float() if anchors else None
                alt = a if anchors else lc.encode_text(alt_prompts).float()
            embeds[key] = (c, a, alt)
        return embeds[key]

    def latent_clip_safety_guidance(args):
        denoised, sigma, base = args["denoised"], args["sigma"], args["model"]
        s = float(sigma.max()) if isinstance(sigma, torch.Tensor) else float(sigma)
        run = record.current()
        if "window" not in run:
            run["window"] = sampling_window(base.model_sampling, start_percent, end_percent)
        sigma_start, sigma_end = run["window"]
        if not (sigma_end <= s <= sigma_start):
            record.add_call(s)
            return denoised
        lc = record.model_for_run(handle)
        c, a, alt = text_embeds(lc)
        raw = base.process_latent_out(denoised)
        with torch.inference_mode(False):
            new_raw, stats = safety_guidance(raw, lc, c, noise_level_sigma(base, sigma), scale, anchor_embeds=a,
                                             alternative_embeds=alt, threshold=threshold, max_move=max_move)
        record.add_call(s, stats)
        if not any(stats.fired):
            return denoised   # bit-identical when nothing fired
        fired = torch.tensor(stats.fired, device=denoised.device).view(-1, *[1] * (denoised.ndim - 1))
        back = base.process_latent_in(new_raw.to(device=denoised.device, dtype=denoised.dtype))
        return torch.where(fired, back, denoised)   # items that did not fire keep their exact values

    latent_clip_safety_guidance.latent_clip_record = record
    return latent_clip_safety_guidance


def noise_level_sigma(base, sigma):
    """The sigma whose ``sigma^2 / (sigma^2 + 1)`` is the noise share of the model's input, the schedule the
    guidance weights its steps by. A flow model (SD3, Flux, Wan: ``CONST``) mixes x = (1 - s) x0 + s noise
    with s <= 1, whose noise share is s^2 / (s^2 + (1 - s)^2): the same as sigma = s / (1 - s) of an EPS
    model. Without this, scale would act at half strength at pure noise on those models and fade early.
    Other models' sigma is read in units of their sigma_data (Playground v2.5, EDM: 0.5), whose noise share
    is sigma^2 / (sigma^2 + sigma_data^2); read as 1, the move at sigma 0.5 was a fifth of scale, not half."""
    ms = getattr(base, "model_sampling", None)
    if not isinstance(ms, comfy.model_sampling.CONST):
        sigma_data = float(getattr(ms, "sigma_data", 1.0))
        return sigma if sigma_data == 1.0 else torch.as_tensor(sigma).float() / sigma_data
    s = torch.as_tensor(sigma).float()
    return s / (1.0 - s).clamp(min=1e-6)


def make_run_wrapper(record: GuidanceRecord):
    """OUTER_SAMPLE wrapper: one record per sampling run, with a fingerprint of the run's output."""
    def latent_clip_safety_run(executor, *args, **kwargs):
        sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
        record.start_run(sigmas)
        try:
            output = executor(*args, **kwargs)
        finally:
            record.finish_sampling()
        record.finish_run(output)
        return output
    return latent_clip_safety_run


def check_guided_latent(shape, handle) -> None:
    """Refuse a latent the guidance's Latent-CLIP cannot read, before sampling starts (not at its first
    guided step), in one sentence naming the sampler's latent_image. Its channels match: the node checked
    the Latent-CLIP's family against the MODEL's."""
    if len(shape) == 5 and shape[2] != 1:
        raise InputError(f"latent_image has {shape[2]} latent frames but Latent-CLIP Safety Guidance scores single "
                         f"images; expected one frame [batch, {shape[1]}, 1, height, width]")
    side = handle.patcher.model.min_latent_side()
    if len(shape) >= 4 and min(shape[-2:]) < side:
        raise InputError(f"latent_image is {shape[-2]}x{shape[-1]}, smaller than the {side}x{side} minimum the "
                         "Safety Guidance's latent_clip can read; use a larger latent_image")


def make_prepare_wrapper(record: GuidanceRecord, handle):
    """PREPARE_SAMPLING wrapper: sampling loads the UNet and this Latent-CLIP in one list (it is an
    additional model of the MODEL); the run's Latent-CLIP is taken from there before the first step,
    so no load happens mid-sampling, where it could offload the UNet on a small card. The noise shape
    is known here, so a latent the Latent-CLIP cannot read is refused before anything loads."""
    def latent_clip_safety_prepare(executor, model, *args, **kwargs):
        noise_shape = kwargs.get("noise_shape", args[0] if args else None)
        if noise_shape is not None:
            check_guided_latent(tuple(noise_shape), handle)
        out = executor(model, *args, **kwargs)
        record.prepare_for_run(handle, model)
        return out
    return latent_clip_safety_prepare


def check_unit_number(name: str, value) -> None:
    """One sentence naming ``name`` unless ``value`` is a number in [0, 1]. ComfyUI checks a FLOAT widget only
    with ``< min`` and ``> max``, which NaN passes (an API prompt may carry one): a NaN percent stopped the node
    in ComfyUI's percent_to_sigma with an IndexError, a NaN scale or threshold failed the sampler later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InputError(f"{name} is {value!r}; expected a finite number from 0 to 1")


class LatentCLIPSafetyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPSafetyGuidance",
            display_name="Latent-CLIP Safety Guidance",
            category=CATEGORY,
            description="Patches a MODEL so every sampler step moves its x0 prediction away from the concepts "
                        "(and towards the anchors) along the Latent-CLIP gradient, in latent space, no decoding. "
                        "The move fades with sigma and is bounded; chain several for several concept sets.",
            inputs=[
                io.Model.Input("model"),
                LatentCLIPType.Input("latent_clip"),
                io.String.Input("concepts", multiline=True, default="nudity\nviolence",
                                tooltip="Concepts to steer away from, one per line (scored as 'an image of {concept}')"),
                io.String.Input("anchors", multiline=True, default="", optional=True,
                                tooltip="Optional safe prompts to steer towards, one per line; may be empty"),
                io.Float.Input("scale", default=DEFAULT_SCALE, min=0.0, max=1.0, step=0.005,
                               tooltip="Fraction of the latent's norm moved per step at high noise; 0 = off "
                                       "(the model is returned unpatched). Each step is capped at 0.2."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guide an item only while its concept probability is above this; 0 = always"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, latent_clip, concepts, anchors="", scale=DEFAULT_SCALE, start_percent=0.0,
                end_percent=1.0, threshold=0.0) -> io.NodeOutput:
        check_vae_family(latent_clip, model)
        for name, value in (("scale", scale), ("start_percent", start_percent), ("end_percent", end_percent),
                            ("threshold", threshold)):
            check_unit_number(name, value)
        concept_list = text_lines(concepts, "concepts")
        anchor_list = [line.strip() for line in (anchors or "").split("\n") if line.strip()]   # "\n" only, as split_lines
        if start_percent > end_percent:
            raise InputError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); "
                             "expected start_percent <= end_percent")
        if scale == 0:
            return io.NodeOutput(model)   # no hook at all: sampling is bit-identical to the input MODEL
        # as the input MODEL samples; each run resolves its window on the model it samples (make_hook)
        sigma_start, sigma_end = sampling_window(model.get_model_object("model_sampling"), start_percent, end_percent)
        settings = {"scale": scale, "start_percent": start_percent, "end_percent": end_percent,
                    "sigma_start": sigma_start, "sigma_end": sigma_end, "threshold": threshold}
        record = GuidanceRecord(next(_patch_ids), concept_list, anchor_list, settings)
        m = model.clone()
        m.set_model_sampler_post_cfg_function(make_hook(latent_clip, record, concept_list, anchor_list, scale,
                                                        start_percent, end_percent, threshold))
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY,
                               make_run_wrapper(record))
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, PATCH_KEY,
                               make_prepare_wrapper(record, latent_clip))
        # Let sampling load the Latent-CLIP with the UNet (memory planning); one entry per Latent-CLIP.
        extra = m.get_additional_models_with_key(PATCH_KEY)
        if not any(p.model is latent_clip.patcher.model for p in extra):
            m.set_additional_models(PATCH_KEY, extra + [latent_clip.patcher])
        return io.NodeOutput(m)


class LatentCLIPGuidanceReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPGuidanceReport",
            display_name="Latent-CLIP Guidance Report",
            category=CATEGORY,
            description="What the safety guidance patches on this MODEL did in the sampling run that produced "
                        "'samples': guided calls and concept probability before/after, per item.",
            inputs=[
                io.Model.Input("model", tooltip="The patched MODEL (as given to the sampler)"),
                io.Latent.Input("samples", tooltip="The sampler's output; also makes this node run after sampling"),
            ],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        x = samples.get("samples") if isinstance(samples, dict) else None
        records = records_of(model)
        if not records:
            text = "no Latent-CLIP safety guidance on this model (scale 0 adds none)"
        else:
            text = "\n".join(r.report(x) for r in records)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [LatentCLIPSafetyGuidance, LatentCLIPGuidanceReport]
