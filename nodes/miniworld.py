"""The mini-world as a ComfyUI model family: every node of the pack runs on a CPU in seconds, no download.

``Load mini-world`` gives the shipped mini generator (``weights/mini``) as a MODEL, its text encoder as a
CLIP for the core CLIPTextEncode, and the mini VAE as a VAE for VAE Decode / VAE Encode:

* MODEL: a ComfyUI ``BaseModel`` of type FLOW (``ModelSamplingDiscreteFlow`` + ``CONST``, shift 1): the
  generator's rectified flow x_t = (1 - t) x0 + t noise predicting v = noise - x0 is exactly ComfyUI's
  flow parametrisation with sigma = t, so KSampler, SamplerCustom, the Search and ReNO samplers drive it
  with the stock schedulers (``simple`` with 4 steps gives the generator's own 1, .75, .5, .25, 0).
  Its latent format ``Mini`` standardises raw mini-VAE latents per channel (the generator's training
  statistics); the VAE family it reports is "mini", which the mini Latent-CLIP is trained on.
* CLIP: the generator's word-level encoder; a prompt outside the grammar is refused in one sentence.
* VAE: raw 8x8x4 latents <-> 64x64 RGB (any multiple of 8 for Encode).

The mini Latent-CLIP and the mini pixel CLIP go through the pack's own loaders: the pack's ``weights``
folder is registered as an extra ``models/latent_clip`` and ``models/open_clip`` folder, so Load
Latent-CLIP lists ``mini/mini-latent-clip.safetensors`` and Pixel-CLIP Reward ``mini/mini-pixel-clip.safetensors``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from latentclip.errors import InputError
from latentclip.miniworld import generator as G, judge, scenes
from latentclip.miniworld.vae import MiniVAE, load_vae

from .comfy_bridge import LATENT_CLIP_FOLDER, OPEN_CLIP_FOLDER, WholeModelPatcher, register_model_folders

#: The pack's shipped weights: ``mini/`` holds the mini-world (generator, VAE, both CLIPs).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
#: A mini-world is a folder of WEIGHTS_DIR holding these two files (its CLIPs are picked in the loaders).
GENERATOR_FILE, VAE_FILE = G.FILE, "mini-vae.safetensors"
#: The generator's time input is t in [0, 1]; ComfyUI's flow sampling hands timesteps t * MULTIPLIER.
MULTIPLIER = 1000.0


def register_mini_folders() -> None:
    """Make the shipped mini Latent-CLIP and pixel CLIP pickable in the pack's loaders (listed as ``mini/...``)."""
    register_model_folders()
    for name in (LATENT_CLIP_FOLDER, OPEN_CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, WEIGHTS_DIR)


def worlds() -> list:
    """Folders of WEIGHTS_DIR that hold a mini generator and a mini VAE ("mini", ...)."""
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(d for d in os.listdir(WEIGHTS_DIR)
                  if all(os.path.isfile(os.path.join(WEIGHTS_DIR, d, f)) for f in (GENERATOR_FILE, VAE_FILE)))


# -- MODEL ----------------------------------------------------------------------------------------
class Mini(comfy.latent_formats.LatentFormat):
    """Latent format of the mini-world: raw mini-VAE latents standardised per channel for the generator.

    The class name is the VAE family ``nodes.comfy_bridge.model_vae_family`` reports ("mini")."""
    latent_channels = 4

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.detach().float().view(1, -1, 1, 1), std.detach().float().view(1, -1, 1, 1)

    def process_in(self, latent):
        """Checked first: the per-channel statistics would broadcast against another channel count (torch's
        size error) or a 5-D video latent (a wrong shape the model then reports)."""
        channels = self.mean.shape[1]
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise InputError(f"latent_image is {'x'.join(str(s) for s in latent.shape[1:])} but the mini-world draws "
                             f"{channels}-channel image latents [batch, {channels}, height, width]: start from a 64x64 "
                             "Empty Latent Image or encode with Load mini-world's VAE")
        return (latent - self.mean.to(latent)) / self.std.to(latent)

    def process_out(self, latent):
        return latent * self.std.to(latent) + self.mean.to(latent)


def check_mini_latent(x: torch.Tensor, generator: G.MiniGenerator) -> None:
    """Refuse a latent the generator cannot draw (it has one position embedding, for 8x8 latents), in one
    sentence naming latent_image and what to set, instead of torch's broadcast error mid-sampling."""
    channels, side = generator.latent_channels, tuple(generator.pos.shape[-2:])
    if x.ndim == 4 and x.shape[1] == channels and tuple(x.shape[-2:]) == side:
        return
    got = "x".join(str(s) for s in x.shape[1:])
    if x.ndim == 4:
        got += f" (a {x.shape[-1] * 8}x{x.shape[-2] * 8} image)"
    raise InputError(f"latent_image is {got} but the mini-world draws {side[1] * 8}x{side[0] * 8} images, i.e. "
                     f"{channels}x{side[0]}x{side[1]} latents: set Empty Latent Image to {side[1] * 8}x{side[0] * 8}")


class MiniVelocity(nn.Module):
    """The generator's velocity network in ComfyUI's diffusion-model calling convention."""

    def __init__(self, generator: G.MiniGenerator):
        super().__init__()
        self.generator = generator

    @property
    def dtype(self):
        return self.generator.pos.dtype

    def forward(self, x, timesteps, context=None, mini_pooled=None, mini_pad=None, control=None,
                transformer_options={}, **kwargs):
        if context is None or mini_pooled is None or mini_pad is None:
            raise InputError("the mini-world MODEL needs CONDITIONING from CLIP Text Encode with the mini-world CLIP "
                             "(Load mini-world's CLIP output)")
        check_mini_latent(x, self.generator)
        t = timesteps.float() / MULTIPLIER
        return self.generator.velocity(x, t, (context, mini_pooled, mini_pad > 0.5))


class MiniWorldConfig(comfy.supported_models_base.BASE):
    """Model config of the mini generator: a rectified flow (sigma = t), no UNet to build."""
    unet_config = {"disable_unet_model_creation": True}
    sampling_settings = {"shift": 1.0, "multiplier": MULTIPLIER}
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 0.1


class MiniWorldModel(comfy.model_base.BaseModel):
    """ComfyUI BaseModel around the mini generator; conditioning carries its token sequence, pooled
    vector and padding mask (CLIP Text Encode with the mini-world CLIP writes all three)."""

    def __init__(self, generator: G.MiniGenerator, device=None):
        config = MiniWorldConfig({"disable_unet_model_creation": True})
        config.latent_format = Mini(generator.latent_mean, generator.latent_std)
        super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = MiniVelocity(generator)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        for key in ("mini_pooled", "mini_pad"):
            if kwargs.get(key) is not None:
                out[key] = comfy.conds.CONDRegular(kwargs[key])
        return out


# -- CLIP (text encoder) --------------------------------------------------------------------------
class MiniTokenizer:
    """Words of the mini-world grammar -> token ids (``latentclip.miniworld.generator.tokenize``)."""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"mini": G.tokenize([text])}

    def state_dict(self):
        return {}


class MiniTextStage(nn.Module):
    """The generator's text encoder as ComfyUI's ``cond_stage_model``: tokens -> (sequence, pooled, extras)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, tokens):
        ids = tokens["mini"].to(self.encoder.pos.device)
        seq, pooled, pad = self.encoder(ids)
        out = mm.intermediate_device()
        return seq.to(out), pooled.to(out), {"mini_pooled": pooled.to(out), "mini_pad": pad.float().to(out)}


def text_encoder_clip(encoder: nn.Module) -> comfy.sd.CLIP:
    """A ComfyUI CLIP (for the core CLIP Text Encode) holding the generator's text encoder."""
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = MiniTextStage(encoder)
    clip.tokenizer = MiniTokenizer()
    clip.patcher = comfy.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=mm.text_encoder_device(),
                                                    offload_device=mm.text_encoder_offload_device())
    clip.patcher.is_clip = True
    clip.layer_idx, clip.use_clip_schedule, clip.apply_hooks_to_conds, clip.tokenizer_options = None, False, None, {}
    return clip


# -- VAE ------------------------------------------------------------------------------------------
class SignedMiniVAE(nn.Module):
    """The mini VAE in ComfyUI's first-stage convention: images in [-1, 1] <-> raw latents (posterior mean)."""

    def __init__(self, vae: MiniVAE):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)[0]

    def decode(self, z, **kwargs):
        return self.decoder(z)


class MiniWorldVAE(comfy.sd.VAE):
    """A ComfyUI VAE (VAE Decode / Encode, Pixel-CLIP Reward) around the mini VAE: factor 8, 4 channels."""

    def __init__(self, vae: MiniVAE):  # the attributes comfy.sd.VAE sets, for a model it cannot detect
        self.memory_used_encode = lambda shape, dtype: 2000 * shape[2] * shape[3] * mm.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: 2000 * shape[2] * shape[3] * 64 * mm.dtype_size(dtype)
        self.downscale_ratio = self.upscale_ratio = 8
        self.latent_channels, self.latent_dim, self.output_channels = 4, 2, 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.float32]
        self.disable_offload, self.not_video, self.crop_input = False, False, True
        self.downscale_index_formula = self.upscale_index_formula = self.extra_1d_channel = None
        self.first_stage_model = SignedMiniVAE(vae).eval()
        self.device, self.vae_dtype = mm.vae_device(), torch.float32
        self.output_device = mm.intermediate_device()
        self.patcher = WholeModelPatcher(self.first_stage_model, load_device=self.device,   # see load_world
                                         offload_device=mm.vae_offload_device())


# -- the loader node ------------------------------------------------------------------------------
def load_world(world: str):
    """(MODEL patcher, CLIP, VAE) of the mini-world in WEIGHTS_DIR/<world>; built outside inference mode so
    ReNO can backpropagate through the generator and the decoder."""
    if world not in worlds():
        raise InputError(f"world {world!r} is not a folder of {WEIGHTS_DIR} holding {GENERATOR_FILE} and {VAE_FILE}; "
                         f"expected one of {worlds()}")
    folder = os.path.join(WEIGHTS_DIR, world)
    with torch.inference_mode(False):
        generator = G.load_generator(os.path.join(folder, GENERATOR_FILE))
        vae = load_vae(os.path.join(folder, VAE_FILE))
        encoder = generator.text
        del generator.text   # the MODEL never runs it; the CLIP holds it
        base = MiniWorldModel(generator, device=mm.unet_offload_device())
    # Loaded whole (a few MB): the mini models are plain torch layers, which a partial load (--novram) would
    # leave on the CPU, as it skips parameters held beside children (the generator's pos), and ComfyUI casts
    # layer by layer only for comfy.ops layers.
    model = WholeModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    return model, text_encoder_clip(encoder), MiniWorldVAE(vae)


class LatentCLIPMiniWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPMiniWorldLoader",
            display_name="Load mini-world (no downloads)",
            category="latent_clip/mini-world",
            description="The pack's shipped mini-world (weights/mini, 64x64 images of coloured shapes): its text-to-"
                        "latent generator as a MODEL (a rectified flow: KSampler with 4 steps, euler, simple, cfg 1), "
                        "its text encoder as a CLIP for CLIP Text Encode (prompts of the grammar, e.g. 'a red circle "
                        "to the left of a blue square') and its VAE for VAE Decode/Encode. Use a 64x64 Empty Latent "
                        "Image. The mini Latent-CLIP and pixel CLIP are in Load Latent-CLIP and Pixel-CLIP Reward as "
                        "mini/mini-latent-clip.safetensors and mini/mini-pixel-clip.safetensors.",
            inputs=[io.Combo.Input("world", options=worlds() or ["mini"], default="mini",
                                   tooltip="A folder of the pack's weights/ holding generator.safetensors and mini-vae.safetensors")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, world="mini") -> io.NodeOutput:
        return io.NodeOutput(*load_world(world))


NODES = [LatentCLIPMiniWorldLoader]
register_mini_folders()


class LatentCLIPMiniWorldJudge(io.ComfyNode):
    """The mini-world's pixel judge (``latentclip.miniworld.judge``) as a node: whether each image shows the prompt."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPMiniWorldJudge",
            display_name="Mini-world Judge",
            category="latent_clip/mini-world",
            description="Checks decoded mini-world images against a prompt of the grammar with an analytic pixel "
                        "judge (colour segmentation and shape features, no CLIP): per image ok/no and what failed.",
            inputs=[io.Image.Input("images", tooltip="64x64 images from VAE Decode with the mini-world VAE"),
                    io.String.Input("prompt", default="a red circle", tooltip="A prompt of the mini-world grammar")],
            outputs=[io.Int.Output(display_name="correct"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, prompt) -> io.NodeOutput:
        spec = scenes.parse(prompt)   # InputError naming the prompt if it is not of the grammar
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"images must be an IMAGE batch [batch, height, width, 3], got "
                             f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        # a NaN latent decodes to NaN pixels, which the judge would read as black ("no" for every attribute)
        finite = torch.isfinite(images).flatten(1).all(1)
        if not finite.all():
            bad = ", ".join(str(i + 1) for i in torch.nonzero(~finite).flatten().tolist())
            raise InputError(f"images holds NaN or infinite values (image {bad} of {len(images)}); expected finite "
                             "pixels in [0, 1], as VAE Decode makes from finite latents")
        # an IMAGE of a large model takes seconds per image (the judge is made for 64x64): progress per image,
        # and the interrupt is checked per image and during each image's component labelling
        bar = comfy.utils.ProgressBar(len(images))
        verdicts = []
        for img in images:
            mm.throw_exception_if_processing_interrupted()
            verdicts.append(judge.check(img, spec, poll=mm.throw_exception_if_processing_interrupted))
            bar.update(1)
        lines = [f"{i}: {'ok' if v['ok'] else 'no'}" + ("" if v["ok"] else " (" + ", ".join(
            k for k, x in v.items() if k != "ok" and x is False) + ")") for i, v in enumerate(verdicts)]
        correct = sum(v["ok"] for v in verdicts)
        report = f"judge: {correct}/{len(verdicts)} images show {prompt!r}\n" + "\n".join(lines)
        return io.NodeOutput(correct, report, ui=ui.PreviewText(report))


NODES.append(LatentCLIPMiniWorldJudge)
