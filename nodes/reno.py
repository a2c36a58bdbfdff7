"""ReNO nodes: reward terms, a ReNO SAMPLER for SamplerCustom, and an all-in-one node.

ReNO optimises the initial noise of a one-step (or few-step) model by gradient descent on rewards.
The UNet's weights are inference tensors (loaded under the executor's inference mode): during the
loop ``grad_through_comfy_ops`` makes comfy.ops copy them in grad mode; the input tensors are
cloned out of inference mode by ``reno_optimize``; x0 goes through ``process_latent_out`` (raw
latent space) before any reward sees it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import latent_preview
from comfy_api.latest import io, ui

from latentclip import LatentAvoid, LatentMatch, PixelCLIPMatch, reno_optimize
from latentclip.errors import InputError
from latentclip.memory_probe import probe_backward_memory, request_bytes, reward_backward_memory
from latentclip.pixel_clip import MINI_PIXEL_FORMAT
from latentclip.plotting import plot_reno_history
from latentclip.reno import checkpoint_layers, checkpointed
from latentclip.rewards import RewardSum

from .comfy_bridge import (OPEN_CLIP_FOLDER, check_finite_sigmas, check_vae_family, grad_through_comfy_ops,
                           interrupt_check, load_pixel_clip, model_file_problem, text_lines)
from .loaders import LatentCLIPType, listed_model_files

LatentRewardType = io.Custom("LATENT_REWARD")
CATEGORY = "latent_clip/reno"


@dataclass(frozen=True)
class LatentTermSpec:
    """A Latent-CLIP reward term as chosen in the graph; built into a core term when sampling."""
    handle: object
    texts: tuple
    mode: str
    weight: float


@dataclass(frozen=True)
class PixelTermSpec:
    """A pixel-CLIP reward term (decode with the VAE, score with an open_clip model)."""
    clip_name: str
    model_name: str
    vae: object
    texts: tuple
    weight: float


def pixel_handles(specs) -> dict:
    """The pixel CLIP of every Pixel-CLIP Reward term, resolved once for a run and held by it: the pack
    caches one pixel CLIP, so resolving each term on its own would rebuild two of them from disk in turn,
    and a term would run a model whose patcher model management no longer counts."""
    return {(s.clip_name, s.model_name): load_pixel_clip(s.clip_name, s.model_name)
            for s in specs if isinstance(s, PixelTermSpec)}


def reward_patchers(specs, pixels: dict | None = None) -> list:
    """The ModelPatchers the reward terms run (Latent-CLIPs, pixel CLIPs, VAEs), without loading them."""
    pixels = pixel_handles(specs) if pixels is None else pixels
    out = []
    for spec in specs:
        if isinstance(spec, LatentTermSpec) or hasattr(spec, "build_term"):
            out.append(spec.handle.patcher)
        else:
            out += [pixels[(spec.clip_name, spec.model_name)].patcher, spec.vae.patcher]
    return out


def sampling_patchers(model_wrap) -> list:
    """The patchers sampling loaded (``comfy.sampler_helpers.prepare_sampling``): the MODEL's and its additional
    models (ControlNets, ...). A SAMPLER loads its own models in one list with these, never alone: model management
    keeps the models of a list loaded and frees memory from the others (see ``GradModelHandle.load_for_grad_with``)."""
    return [model_wrap.model_patcher, *getattr(model_wrap, "loaded_models", [])]


def build_reward(specs, base_model, batch: int, pixels: dict | None = None, loaded: bool = False):
    """Core reward terms for ``specs``; the ComfyUI modules (VAE decoders) needing grad through comfy.ops.

    Every reward model is loaded in one list first (whole: a decoder loaded in part would be cast piece by
    piece on every iteration), then each is made ready for grad: a load after that could offload a model
    already prepared and bring it back with inference-tensor weights.

    ``loaded``: the caller has loaded every reward model already, in one list with the UNet that is sampling
    (the Search Sampler): nothing is loaded here then. A load of the reward models alone makes model management
    free memory for them and may offload (part of) that UNet, which it does not load back. Each model is still
    made ready for grad (``ready_for_grad``, nothing to do where no move made inference tensors): the core terms
    refuse a model of inference tensors."""
    pixels = pixel_handles(specs) if pixels is None else pixels
    if not loaded:
        mm.load_models_gpu(reward_patchers(specs, pixels), force_full_load=True)
    terms, grad_modules = [], []
    for spec in specs:
        if hasattr(spec, "build_term"):   # terms defined by other node modules (nodes/heads.py)
            terms.append(spec.build_term(base_model, len(terms), loaded))
            continue
        texts = list(spec.texts)
        if len(texts) not in (1, batch) and not (isinstance(spec, LatentTermSpec) and spec.mode == "avoid"):
            raise InputError(f"reward text has {len(texts)} lines but the batch has {batch} latents; expected 1 line or {batch}")
        if isinstance(spec, LatentTermSpec):
            check_vae_family(spec.handle, base_model)
            model = spec.handle.loaded_for_grad() if loaded else spec.handle.load_for_grad()
            cls = LatentMatch if spec.mode == "match" else LatentAvoid
            terms.append(cls(model, texts, weight=spec.weight, name=f"{spec.mode}{len(terms)}"))
        else:
            handle = pixels[(spec.clip_name, spec.model_name)]
            clip = handle.loaded_for_grad() if loaded else handle.load_for_grad()
            fsm, vae_dtype, vae_device = spec.vae.first_stage_model, spec.vae.vae_dtype, spec.vae.device
            clip_device = handle.patcher.load_device

            def decode(z, fsm=fsm, dt=vae_dtype, dev=vae_device, out=clip_device):
                img = fsm.decode(z.to(device=dev, dtype=dt))
                if img.ndim == 5:   # a 3-D VAE (Wan 2.1, Qwen-Image) decodes one latent frame to [B, 3, 1, H, W]
                    img = img[:, :, 0]
                return img.float().to(out)

            terms.append(PixelCLIPMatch(clip, decode, texts, weight=spec.weight, tokenizer=handle.tokenizer,
                                        name=f"pixel{len(terms)}"))
            grad_modules.append(fsm)
    if not terms:
        raise InputError("reward has no terms; connect a Latent-CLIP Reward or Pixel-CLIP Reward node")
    return terms, grad_modules


def _skip_copy(h, transformer_options):
    return h.clone()


def with_control_safe_skips(extra_args: dict) -> dict:
    """extra_args whose UNet keeps a separate copy of each skip connection.

    ComfyUI adds ControlNet outputs to the skip activations in place (``apply_control``: ``h += ctrl``)
    after the next layer has saved them for backward, which autograd refuses ("modified by an inplace
    operation"). An ``input_block_patch_after_skip`` that continues with a copy leaves the stored skip
    to the in-place add and the saved tensor untouched. Nothing shared is modified: the dicts are copied.
    """
    options = dict(extra_args.get("model_options", {}))
    transformer = dict(options.get("transformer_options", {}))
    patches = dict(transformer.get("patches", {}))
    patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [_skip_copy]
    transformer["patches"] = patches
    options["transformer_options"] = transformer
    return dict(extra_args, model_options=options)


def control_models(conds) -> list:
    """The networks of every ControlNet/T2I adapter attached to the processed conditioning."""
    out = []
    for cond_list in (conds or {}).values():
        for c in cond_list or []:
            control = c.get("control") if isinstance(c, dict) else None
            while control is not None:
                for name in ("control_model", "t2i_model"):
                    net = getattr(control, name, None)
                    if isinstance(net, torch.nn.Module) and all(net is not m for m in out):
                        out.append(net)
                control = getattr(control, "previous_controlnet", None)
    return out


#: Bytes of activations kept for backward per latent pixel, per batch item and step, per UNet parameter
#: at 4 bytes per value. Measured with benchmarks/reno_memory.py (docs/benchmarks.md): one ReNO iteration
#: of the SD2.1 UNet (866M parameters) at 64x64 latents peaks 4.2 GB above the weights in float32
#: (1.24e-3); SDXL measures 4.1e-4, so the estimate errs on the large side there.
ACTIVATION_BYTES_PER_PARAM_PIXEL = 1.25e-3
#: With gradient checkpointing (measured the same way: 1611 MB instead of 4207 MB for SD2.1, 0.13x
#: for SDXL at 512 px) the kept activations shrink to at most this share.
CHECKPOINTED_SHARE = 0.38
#: A VAE decode's activations per output image pixel in float32 (SDXL decoder, benchmarks/run.py).
DECODE_BYTES_PER_PIXEL = 0.025 * 2**20


def weight_copy_bytes(unet, steps: int, checkpointing: bool) -> int:
    """Bytes of the UNet weight copies a ReNO forward keeps for backward (``grad_through_comfy_ops`` makes
    comfy.ops copy every weight in grad mode, at each step). Without checkpointing all of them stay; with
    it, those of the layers outside the checkpointed ones, plus one layer's, remade in its recompute."""
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = size(unet)
    if not checkpointing:
        return total * steps
    layers = [size(m) for m in checkpoint_layers(unet)]
    return (total - sum(layers)) * steps + max(layers, default=0)


def reno_working_memory(base, shape, steps: int, checkpointing: bool, pixel_terms: int) -> int:
    """Bytes ReNO's backward pass needs beyond the weights (the estimate ReNO asks ComfyUI to free).

    UNet activations: batch x steps x latent pixels x parameters x ACTIVATION_BYTES_PER_PARAM_PIXEL,
    scaled by CHECKPOINTED_SHARE with checkpointing (calibrated on SD2.1 and SDXL with plain weights);
    plus the weight copies kept for backward (``weight_copy_bytes``), both in the compute dtype; plus
    one decode per pixel-CLIP term.
    """
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    pixels = shape[0] * shape[-2] * shape[-1]
    unet = pixels * steps * params * ACTIVATION_BYTES_PER_PARAM_PIXEL * mm.dtype_size(dtype) / 4
    if checkpointing:
        unet *= CHECKPOINTED_SHARE
    unet += weight_copy_bytes(base.diffusion_model, steps, checkpointing) * mm.dtype_size(dtype)
    return int(unet + pixel_terms * pixels * 64 * DECODE_BYTES_PER_PIXEL)


def _latents_of(channels, dims) -> str:
    return f"{channels}-channel {'3-D (video)' if dims == 3 else 'image'} latents"


def check_pixel_vae(spec: PixelTermSpec, base_model) -> None:
    """Refuse a Pixel-CLIP Reward whose VAE cannot decode the MODEL's latents (else a raw conv shape
    error at the first decode, mid-run)."""
    fmt = base_model.latent_format
    want = (fmt.latent_channels, getattr(fmt, "latent_dimensions", 2))
    got = (getattr(spec.vae, "latent_channels", None), getattr(spec.vae, "latent_dim", 2))
    if got[0] is not None and got != want:
        raise InputError(f"the Pixel-CLIP Reward's vae decodes {_latents_of(*got)} but the model makes "
                         f"{_latents_of(*want)}; connect the model's own VAE")


def check_reno_latent(x, base_model, specs, name: str) -> None:
    """Refuse a latent the UNet or a reward term cannot take, in one sentence naming ``name``.

    A model with 3-D latents (Wan 2.1, Qwen-Image) takes [batch, channels, frames, height, width]; every
    reward term scores one frame (the image), so more frames are refused when there is a reward.
    """
    for spec in specs:
        if isinstance(spec, PixelTermSpec):
            check_pixel_vae(spec, base_model)
    video = getattr(base_model.latent_format, "latent_dimensions", 2) == 3
    layout = "[batch, channels, 1, height, width]" if video else "[batch, channels, height, width]"
    if not isinstance(x, torch.Tensor) or x.ndim != (5 if video else 4) or x.shape[0] == 0:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name} must be a LATENT with samples {layout} and at least one item, got {got}")
    if video and x.shape[2] != 1 and specs:
        raise InputError(f"{name} has {x.shape[2]} latent frames but the reward scores single images; "
                         f"expected {layout}")
    channels = base_model.latent_format.latent_channels
    if x.shape[1] != channels:
        raise InputError(f"{name} has {x.shape[1]} channels but the model makes {channels}-channel latents; "
                         "use a latent made for this model (e.g. EmptyLatentImage)")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values; expected finite latents")
    # Latent-CLIP terms, and terms of other node modules on a Latent-CLIP (head rewards: a ``handle``)
    sides = [s.handle.patcher.model.min_latent_side() for s in specs if getattr(s, "handle", None) is not None]
    if sides and min(x.shape[-2:]) < max(sides):
        raise InputError(f"{name} is {x.shape[-2]}x{x.shape[-1]}, smaller than the {max(sides)}x{max(sides)} "
                         "minimum the Latent-CLIP reward can read")


class refusing_in_place_models:
    """Turn autograd's "modified by an inplace operation" error into one sentence naming the model input:
    some ComfyUI models (Flux) add in place to activations autograd saved, so no gradient reaches the noise."""

    def __init__(self, base_model):
        self.name = type(base_model).__name__

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None and issubclass(kind, RuntimeError) and "modified by an inplace operation" in str(error):
            raise InputError(f"ReNO cannot backpropagate through this model: the model input ({self.name}) changes "
                             "in place tensors autograd saved for the gradient; use an SD3- or SDXL-architecture "
                             "model") from None
        return False


def latent_format_for_grad(base) -> None:
    """Replace the model's latent-format tensors made under the executor's inference mode (Wan 2.1's per-channel
    mean and std, ...) by equal ordinary ones: ``process_latent_out`` moves them with ``.to()``, which hands the
    same inference tensor back on its own device, and autograd refuses to save it for ReNO's backward pass.
    Ordinary tensors serve inference mode alike, so the model is otherwise unchanged."""
    fmt = getattr(base, "latent_format", None)
    with torch.inference_mode(False):
        for name, value in list(vars(fmt).items()) if fmt is not None else ():
            if isinstance(value, torch.Tensor) and value.is_inference():
                setattr(fmt, name, value.clone())


class ReNOSampler(comfy.samplers.Sampler):
    """A SAMPLER that runs ReNO: its result is the best x0 found, in the sampler's scaled space."""

    def __init__(self, reward, iterations, learning_rate, optimizer, grad_clip, regularization, seed,
                 gradient_checkpointing=True):
        self.reward, self.iterations, self.learning_rate = tuple(reward), iterations, learning_rate or None
        self.optimizer, self.grad_clip, self.regularization, self.seed = optimizer, grad_clip, regularization, seed
        self.gradient_checkpointing = gradient_checkpointing
        self.last_result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model
        ms = base.model_sampling
        max_denoise = self.max_denoise(model_wrap, sigmas)
        check_reno_latent(noise, base, self.reward, "noise")
        check_finite_sigmas(sigmas, "a finite schedule of a one-step model such as SDXL-Turbo",
                            " (a continuous EDM schedule, e.g. Playground v2.5's, maps SDTurboScheduler's timesteps to them)")
        if not torch.any(noise):
            raise InputError("noise is all zeros (SamplerCustom's add_noise is off?); ReNO optimises the initial "
                             "noise, so it needs add_noise on (or use the ReNO node, which always adds noise)")
        if latent_image is not None:
            check_reno_latent(latent_image, base, self.reward, "latent_image")
        pixels = pixel_handles(self.reward)
        self.request_memory(model_wrap, base, noise.shape, len(sigmas) - 1, pixels)
        terms, decoders = build_reward(self.reward, base, noise.shape[0], pixels)
        controls = control_models(getattr(model_wrap, "conds", None))
        if controls:
            extra_args = with_control_safe_skips(extra_args)
        with torch.inference_mode(False):
            latent_format_for_grad(base)
            sig = sigmas.detach().clone()
            start = (latent_image if latent_image is not None else torch.zeros_like(noise)).detach().clone()
            mask = None if denoise_mask is None else denoise_mask.detach().to(noise.device, torch.float32).clone()

        def make_generator(start, mask, extra_args):
            def keep_unmasked(x0):   # inpainting: only the masked region changes, as ComfyUI's samplers do
                return x0 if mask is None else x0 * mask + start * (1 - mask)

            def generator(z):
                x = ms.noise_scaling(sig[0], z, torch.zeros_like(z) if start is None else start, max_denoise)
                for i in range(len(sig) - 1):
                    x0 = keep_unmasked(model_wrap(x, sig[i] * x.new_ones(x.shape[0]), **extra_args))
                    x = x0 if sig[i + 1] == 0 else x0 + (x - x0) * (sig[i + 1] / sig[i])  # deterministic Euler
                return base.process_latent_out(ms.inverse_noise_scaling(sig[-1], x))
            return generator

        generator = make_generator(start, mask, extra_args)

        def on_step(step):
            interrupt_check()
            if callback is not None:
                best = base.process_latent_in(step.best_latents.to(noise.device))
                callback(step.iteration, best, best, step.iterations)

        @contextlib.contextmanager
        def grad_context(decoders):
            layers = []
            if self.gradient_checkpointing:
                layers = [m for net in (base.diffusion_model, *controls, *decoders) for m in checkpoint_layers(net)]
            with grad_through_comfy_ops(base.diffusion_model, *controls, *decoders), checkpointed(layers), \
                    refusing_in_place_models(base):
                yield

        if measure_working_memory(noise.device):
            # the same generator at reduced sizes: no inpainting mix (its tensors have the full size)
            probe_args = dict(extra_args)
            if "denoise_mask" in probe_args:
                probe_args["denoise_mask"] = None
            with grad_context(decoders):
                need = self.measure_memory(make_generator(None, None, probe_args), terms, noise)
            if need is not None and need > self.requested:
                # loaded again outside the grad set-up, which a load undoes (a partly loaded UNet's weight
                # functions, a reloaded model's inference-tensor weights); then the reward is prepared again
                self.requested = need
                mm.load_models_gpu(self._patchers(model_wrap, pixels), memory_required=need, minimum_memory_required=need)
                terms, decoders = build_reward(self.reward, base, noise.shape[0], pixels)
        with grad_context(decoders):
            self.last_result = reno_optimize(
                generator, noise, terms, iterations=self.iterations, lr=self.learning_rate,
                optimizer=self.optimizer, grad_clip=self.grad_clip, regularization=self.regularization,
                callback=on_step, seed=self.seed)
        return base.process_latent_in(self.last_result.latents.to(device=noise.device, dtype=noise.dtype))

    def request_memory(self, model_wrap, base, shape, steps: int, pixels: dict | None = None) -> None:
        """Ask ComfyUI's model management for ReNO's working memory, with every model ReNO runs loaded:
        other models are offloaded (or the UNet loaded in part) instead of running out of memory.
        This first request is the estimate from parameters (``reno_working_memory``); on a GPU
        ``measure_memory`` then measures the real generator and ``sample`` asks again if it needs more."""
        pixel_terms = sum(isinstance(s, PixelTermSpec) for s in self.reward)
        self.requested = reno_working_memory(base, shape, steps, self.gradient_checkpointing, pixel_terms)
        mm.load_models_gpu(self._patchers(model_wrap, pixels), memory_required=self.requested,
                           minimum_memory_required=self.requested)

    def measure_memory(self, generator, terms, noise) -> int | None:
        """Measure the generator's backward at reduced sizes and the reward's at the real size
        (``latentclip.memory_probe``): the bytes to ask model management for, or None if measuring failed.
        The caller asks again when that exceeds the first request."""
        try:
            probe = probe_backward_memory(generator, tuple(noise.shape), noise.device, noise.dtype)
            reward = reward_backward_memory(lambda x: RewardSum(terms).evaluate(x)[0], tuple(noise.shape), noise.device, noise.dtype)
        except (RuntimeError, ValueError) as e:   # out of memory, or a conditioning tied to the full size
            logging.warning("Latent-CLIP ReNO: measuring the working memory failed (%s); keeping the estimate "
                            "of %.0f MiB", str(e).splitlines()[0] if str(e) else type(e).__name__, self.requested / 2**20)
            return None
        need = request_bytes(probe["bytes"], reward)
        self.measured = {**probe, "reward_bytes": reward, "request_bytes": need, "estimate_bytes": self.requested}
        return need

    def _patchers(self, model_wrap, pixels: dict | None = None) -> list:
        return [*sampling_patchers(model_wrap), *reward_patchers(self.reward, pixels)]



def measure_working_memory(device) -> bool:
    """Whether ReNO measures its working memory: where ComfyUI plans memory (a GPU); on the CPU model
    management is off and the estimate from parameters is only recorded."""
    return torch.device(device).type != "cpu" and mm.vram_state != mm.VRAMState.DISABLED


def _reward_inputs():
    return [io.Float.Input("weight", default=0.01, min=-100.0, max=100.0, step=0.001,
                           tooltip="Multiplies this term's loss; 0.01 is ReNO's weight for its CLIP loss 100 - exp(logit_scale)*cos"),
            LatentRewardType.Input("reward", optional=True, tooltip="Chain: terms are added")]


class LatentCLIPReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPReward", display_name="Latent-CLIP Reward", category=CATEGORY,
            description="A reward term on the raw latent, no decode. match: loss 100 - exp(logit_scale)*cos to the "
                        "prompt; avoid: loss exp(logit_scale)*cos to the concepts (pushes away).",
            inputs=[LatentCLIPType.Input("latent_clip"),
                    io.String.Input("text", multiline=True, default="a photo of a cat",
                                    tooltip="match: one prompt, or one line per batch item; avoid: one concept per line"),
                    io.Combo.Input("mode", options=["match", "avoid"], default="match"), *_reward_inputs()],
            outputs=[LatentRewardType.Output(display_name="reward")])

    @classmethod
    def execute(cls, latent_clip, text, mode="match", weight=0.01, reward=None) -> io.NodeOutput:
        check_finite_floats(weight=float(weight))
        spec = LatentTermSpec(latent_clip, tuple(text_lines(text, "text")), mode, float(weight))
        return io.NodeOutput(tuple(reward or ()) + (spec,))


def pixel_clip_options() -> list:
    """Files in models/open_clip as Load Latent-CLIP lists its folder: every user file, and of the pack's own
    weights/ (registered as a models/open_clip folder for that one file) only the mini pixel CLIP."""
    return listed_model_files(OPEN_CLIP_FOLDER, lambda fmt: fmt == MINI_PIXEL_FORMAT)


def _pixel_reward_schema(node_id: str, deprecated: bool = False) -> io.Schema:
    return io.Schema(
        node_id=node_id, display_name="Pixel-CLIP Reward (baseline)", category=CATEGORY,
        description="ReNO's pixel CLIP reward: decode with the VAE, resize to the CLIP input, score with an "
                    "open_clip model from models/open_clip. Costs a VAE decode per iteration." +
                    (" Deprecated id: new graphs use LatentCLIPPixelReward (the same node)." if deprecated else ""),
        inputs=[io.Combo.Input("clip_name", options=pixel_clip_options(),
                               tooltip="A pixel CLIP in models/open_clip (open_clip weights, or the mini-world's "
                                       "mini/mini-pixel-clip.safetensors)"),
                io.String.Input("model_name", default="", tooltip="open_clip architecture, e.g. ViT-H-14; empty: inferred"),
                io.Vae.Input("vae"),
                io.String.Input("text", multiline=True, default="a photo of a cat"), *_reward_inputs()],
        outputs=[LatentRewardType.Output(display_name="reward")],
        is_deprecated=deprecated)


def _pixel_reward_node(node_id: str, deprecated: bool = False) -> type:
    """The Pixel-CLIP Reward node under ``node_id``. A factory, not a subclass, for the deprecated first id: V3
    caches schema fields on the class, and a subclass would inherit its parent's."""
    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return _pixel_reward_schema(node_id, deprecated)

        @classmethod
        def validate_inputs(cls, clip_name):
            """Refuse a name that is not a listed file at /prompt (a V3 Combo does not check its options).
            A linked input arrives as None here and is checked when the node runs."""
            return clip_name is None or model_file_problem(OPEN_CLIP_FOLDER, "clip_name", clip_name, pixel_clip_options()) or True

        @classmethod
        def execute(cls, clip_name, model_name, vae, text, weight=0.01, reward=None) -> io.NodeOutput:
            check_finite_floats(weight=float(weight))
            spec = PixelTermSpec(clip_name, model_name.strip(), vae, tuple(text_lines(text, "text")), float(weight))
            return io.NodeOutput(tuple(reward or ()) + (spec,))

    Node.__name__ = Node.__qualname__ = node_id
    return Node


LatentCLIPPixelReward = _pixel_reward_node("LatentCLIPPixelReward")
#: The node's first id, without the pack's prefix: kept (deprecated, hidden from the node search) so that saved
#: workflows naming it still load and run.
PixelCLIPReward = _pixel_reward_node("PixelCLIPReward", deprecated=True)


def check_finite_floats(**values) -> None:
    """Refuse a NaN FLOAT input naming it: ComfyUI's range check lets NaN through (an API prompt can carry one),
    and the core would name its own parameter ("lr") or, for cfg, only fail on the model's NaN output."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name} is {value!r}; expected a finite number")


def _loop_inputs():
    return [io.Int.Input("iterations", default=50, min=1, max=1000),
            io.Float.Input("learning_rate", default=0.0, min=0.0, max=1000.0, step=0.01,
                           tooltip="0 = the optimizer's default: 5.0 for sgd (ReNO's), 0.01 for adam"),
            io.Combo.Input("optimizer", options=["sgd", "adam"], default="sgd"),
            io.Float.Input("grad_clip", default=0.1, min=0.0, max=100.0, step=0.01, tooltip="Per-item gradient norm bound; 0 = off"),
            io.Float.Input("regularization", default=0.01, min=0.0, max=10.0, step=0.001,
                           tooltip="Weight of the chi-norm prior that keeps the noise Gaussian-like"),
            io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                             tooltip="Recompute the UNet's (and a pixel reward's VAE decoder's) activations in "
                                     "backward instead of storing them: 0.13-0.38x the memory for about 1.5x the time "
                                     "(docs/benchmarks.md)")]


class LatentCLIPReNOSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPReNOSampler", display_name="ReNO Sampler (Latent-CLIP)", category=CATEGORY,
            description="A SAMPLER for SamplerCustom/SamplerCustomAdvanced with SDTurboScheduler sigmas: optimises the "
                        "initial noise for the reward, returns the best x0. Needs add_noise on.",
            inputs=[LatentRewardType.Input("reward"), io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                                                                   tooltip="Seeds stochastic parts of the loop"),
                    *_loop_inputs()],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, reward, seed, iterations, learning_rate, optimizer, grad_clip, regularization,
                gradient_checkpointing=True) -> io.NodeOutput:
        check_finite_floats(learning_rate=learning_rate, grad_clip=grad_clip, regularization=regularization)
        return io.NodeOutput(ReNOSampler(reward, iterations, learning_rate, optimizer, grad_clip, regularization, seed,
                                         gradient_checkpointing))


def turbo_sigmas(model, steps: int) -> torch.Tensor:
    """SDTurboScheduler's sigmas: timesteps 999, 899, ... for ``steps`` steps, then 0."""
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[:steps]
    sigmas = model.get_model_object("model_sampling").sigma(timesteps)
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _image_tensor(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


class LatentCLIPReNO(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPReNO", display_name="ReNO (reward-based noise optimisation)", category=CATEGORY,
            description="Optimises the initial noise of a one-step model (SDXL-Turbo, SD-Turbo) for the reward. "
                        "Returns the best latent, the un-optimised one, and the reward history.",
            inputs=[io.Model.Input("model"), io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                    io.Latent.Input("latent_image"), LatentRewardType.Input("reward"),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                    *_loop_inputs(),
                    io.Int.Input("steps", default=1, min=1, max=4, tooltip="1 for SDXL-Turbo; gradients flow through every step"),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="1.0 for Turbo models (no uncond pass)")],
            outputs=[io.Latent.Output(display_name="best"), io.Latent.Output(display_name="initial"),
                     io.String.Output(display_name="history"), io.Image.Output(display_name="plot")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, reward, seed, iterations, learning_rate, optimizer,
                grad_clip, regularization, gradient_checkpointing=True, steps=1, cfg=1.0) -> io.NodeOutput:
        check_finite_floats(learning_rate=learning_rate, grad_clip=grad_clip, regularization=regularization, cfg=cfg)
        samples = latent_image.get("samples") if isinstance(latent_image, dict) else None
        if isinstance(samples, torch.Tensor) and samples.ndim in (4, 5) and samples.shape[0] > 0:
            samples = comfy.sample.fix_empty_latent_channels(model, samples)
        check_reno_latent(samples, model.model, reward, "latent_image")
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        sampler = ReNOSampler(reward, iterations, learning_rate, optimizer, grad_clip, regularization, seed,
                              gradient_checkpointing)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        callback = latent_preview.prepare_callback(model, iterations)
        best = guider.sample(noise, samples, sampler, turbo_sigmas(model, steps), denoise_mask=latent_image.get("noise_mask"),
                             callback=callback, seed=seed)
        result = sampler.last_result
        out_device = mm.intermediate_device()
        best_latent = {**latent_image, "samples": best.detach().to(out_device)}
        initial_latent = {**latent_image, "samples": result.initial_latents.to(device=out_device, dtype=best.dtype)}
        summary = result.to_dict()
        text = json.dumps(summary)
        plot = _image_tensor(plot_reno_history(summary["history"]))
        report = ("best iteration per item: " + ", ".join(map(str, result.best_iteration)) +
                  "\nloss initial -> best: " + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(result.initial_loss, result.best_loss)) +
                  f"\n{result.seconds_per_iteration:.3f} s per iteration")
        return io.NodeOutput(best_latent, initial_latent, text, plot, ui=ui.PreviewText(report))


NODES = [LatentCLIPReward, LatentCLIPPixelReward, PixelCLIPReward, LatentCLIPReNOSampler, LatentCLIPReNO]
