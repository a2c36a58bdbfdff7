"""Inference-time search nodes: a SAMPLER that runs another SAMPLER on N particles per item and steers
them with Latent-CLIP (or pixel) rewards of their x0 predictions; a node that reports its history.
How the inner sampler runs on particles, and which samplers each strategy can steer: ``nodes.search_particles``.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import comfy.model_management as mm
import comfy.samplers
from comfy_api.latest import io, ui

from latentclip.errors import InputError
from latentclip.plotting import plot_search_history
from latentclip.search import STRATEGIES, POTENTIALS, SearchSettings, auto_start, search

from .comfy_bridge import check_finite_sigmas
from .reno import LatentRewardType, _image_tensor, check_reno_latent
from .search_particles import _SEED_MOD, OWN_STEP_SAMPLERS, ParticleRun, check_inner_sampler

CATEGORY = "latent_clip/search"


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
        check_finite_sigmas(sigmas, "a finite schedule (e.g. from BasicScheduler)")
        run = ParticleRun(self, settings, name, model_wrap, sigmas, extra_args, callback, noise, latent_image,
                           denoise_mask)
        result = search(run.advance, run.x, run.steps, run.score, run.batch, settings, callback=run.on_scored)
        samples = base.model_sampling.inverse_noise_scaling(sigmas[-1], result.samples).to(noise.dtype)
        if callback is not None:  # the final preview/denoised output is the winner (its last x0 if the schedule stops early)
            x0 = samples if float(sigmas[-1]) == 0 else run.progress["preview"]
            callback(run.total_units - 1, x0, samples, run.total_units)
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
        if strategy == "prune" and not prune_at:
            raise InputError(f"prune_steps is empty; expected the steps after which to prune, e.g. '2, 4', got {prune_steps!r}")
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
