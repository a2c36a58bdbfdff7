"""LatentCLIP: open_clip's CLIP whose image tower reads VAE latents instead of pixels.

Only the patch embedding differs from open_clip: ``visual.conv1`` takes the VAE's latent channels
(4 for SDXL) with a patch size in latent units. Module names are open_clip's, so a state dict maps
one to one onto ``open_clip.CLIP`` with a 4-channel ``conv1``.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
import open_clip
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import LayerNormFp32

from . import configs as _configs
from .errors import InputError
from .families import check_latents_for_family, image_latents

_OUR_VISION_KEYS = ("latent_factor", "latent_channels", "latent_n_channels", "latent_encoder_name")

#: How latents whose size differs from the trained size are fed to the model.
#: "resize" (default): area-pool (or bilinearly upsample) to the trained latent size. This is how
#:   the authors scored 1024x1024 images (128x128 latents pooled to 64x64) and keeps the model on
#:   the exact token grid it was trained on; other aspect ratios are squashed to a square.
#: "native": keep the latent's own size and aspect; interpolate the positional embedding to its
#:   patch grid (sides must be multiples of the patch size). Untested by the authors.
RESIZE_POLICIES = ("resize", "native")


class Fp32PatchEmbed(nn.Conv2d):
    """``visual.conv1`` of a half-precision tower, computed and returned in fp32.

    An fp16 patch embedding overflows (|output| > 65504) on latents of large magnitude (~3e4 with
    B-8-512 shapes, random weights; the latent itself turns inf when cast to fp16 above 65504), and
    one inf makes every feature NaN. In fp32 the stem stays finite and ``ln_pre`` brings the tokens
    back to unit scale, so the transformer after it keeps the model's dtype (tests/core/test_fail_closed.py).
    """

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.conv2d(x.float(), self.weight.float(), bias, self.stride, self.padding, self.dilation, self.groups)


class StemLayerNorm(LayerNormFp32):
    """``visual.ln_pre`` after an fp32 stem: normalises in fp32, hands the transformer its own dtype."""

    tower_dtype = None

    def forward(self, x):
        return super().forward(x).to(self.tower_dtype or x.dtype)


def build_open_clip(cfg: dict) -> CLIP:
    """Plain ``open_clip.CLIP`` for ``cfg`` with the latent patch embedding: the reference model."""
    v = {k: val for k, val in cfg["vision_cfg"].items() if k not in _OUR_VISION_KEYS}
    v["image_size"] = _configs.latent_size(cfg)
    channels = cfg["vision_cfg"].get("latent_channels", cfg["vision_cfg"].get("latent_n_channels", 4))
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**v), CLIPTextCfg(**cfg["text_cfg"]),
                 quick_gelu=cfg.get("quick_gelu", False))
    old = model.visual.conv1
    model.visual.conv1 = nn.Conv2d(channels, old.out_channels, kernel_size=old.kernel_size,
                                   stride=old.stride, bias=False)
    return model


class LatentCLIP(nn.Module):
    """A Latent-CLIP: ``encode_latents`` on raw VAE latents, ``encode_text`` on strings.

    Both return unnormalised features, exactly what open_clip's ``encode_image``/``encode_text``
    return on the same weights. ``self.clip`` is the underlying ``open_clip.CLIP`` (its
    ``state_dict`` is in open_clip's layout, without a prefix).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = _configs.get_config(cfg)
        self.clip = build_open_clip(self.config)
        self.vae_family = self.config.get("vae_family", "sdxl")
        self.latent_channels = self.clip.visual.conv1.in_channels
        self.latent_size = _configs.latent_size(self.config)
        self.patch_size = self.config["vision_cfg"]["patch_size"]
        self.context_length = self.config["text_cfg"]["context_length"]
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        self._text_cache: dict = {}
        self._text_cache_key: tuple | None = None   # the text weights the cache was made with

    # -- state dict in open_clip layout (no "clip." prefix) --------------------------------------
    def load_open_clip_state_dict(self, state_dict: dict, strict: bool = True):
        self._text_cache.clear()
        return self.clip.load_state_dict(state_dict, strict=strict)

    def open_clip_state_dict(self) -> dict:
        return self.clip.state_dict()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @device.setter
    def device(self, _value):
        """Ignored: the device is always read off the weights (model managers may assign it)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype  # LayerNorms may stay fp32 in a half model

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype latents enter the tower in: fp32 for a half model (its stem runs in fp32)."""
        return torch.float32 if isinstance(self.clip.visual.conv1, Fp32PatchEmbed) else self.dtype

    def _fp32_tensors(self, half: torch.dtype) -> dict:
        """The parameters a ``half`` model keeps in fp32, by name: LayerNorms and logit_scale; with bf16 the text
        tower too. By name, not identity: a cast may replace the parameter objects (torch's
        ``set_overwrite_module_params_on_conversion``), and a freed object's id can be reused by another."""
        norms = {name for name, m in self.clip.named_modules() if isinstance(m, nn.LayerNorm)}
        text = ("token_embedding.", "transformer.", "ln_final.", "positional_embedding", "text_projection")
        return {name: t for name, t in self.clip.named_parameters()
                if name == "logit_scale" or name.rpartition(".")[0] in norms
                or (half == torch.bfloat16 and name.startswith(text))}

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()  # cached embeddings follow the old device/dtype
        # fp32 values of what a half model keeps in fp32 (both halves' sets): restored after the cast below
        # instead of being cast up from the rounded copy (bf16 put logit_scale's exp at 98.86, not 100)
        fp32 = {n: t.data for n, t in self._fp32_tensors(torch.bfloat16).items() if t.dtype == torch.float32}
        out = super()._apply(fn, *args, **kwargs)
        half = self.clip.visual.conv1.weight.dtype
        if half in (torch.float16, torch.bfloat16):
            # LayerNorms stay fp32 and normalise in fp32 (open_clip's mixed-precision norm), and so does
            # logit_scale. With bf16 the whole text tower stays fp32 too: it runs once per prompt (cached),
            # and bf16's 8-bit mantissa would put text features ~1.2% off fp32 after 12 layers (fp16 stays
            # within 0.2%).
            for module in self.clip.modules():
                if isinstance(module, nn.LayerNorm):
                    module.__class__ = LayerNormFp32
            for name, t in self._fp32_tensors(half).items():
                if t.dtype != torch.float32:
                    t.data = fp32[name].to(t.device) if name in fp32 else t.data.float()
            visual = self.clip.visual
            visual.conv1.__class__, visual.ln_pre.__class__ = Fp32PatchEmbed, StemLayerNorm
        self.clip.visual.ln_pre.tower_dtype = half   # read by StemLayerNorm only
        return out

    # -- latents -------------------------------------------------------------------------------
    def min_latent_side(self) -> int:
        """Smallest latent side accepted: a quarter of the trained size, and at least one patch."""
        return max(self.patch_size, self.latent_size // 4)

    def check_latents(self, latents, name: str = "latents") -> torch.Tensor:
        """Validate raw VAE latents of this model's family; InputError with one clear sentence if wrong.

        Returns image latents [B, C, H, W]: a 3-D family's single-frame [B, C, 1, H, W] as a view
        without the frame axis (gradients reach the 5-D input), anything else unchanged.
        """
        latents = check_latents_for_family(latents, self.vae_family, name, channels=self.latent_channels)
        h, w = latents.shape[-2:]
        side = self.min_latent_side()
        if min(h, w) < side:
            raise InputError(f"{name} is {h}x{w}, smaller than the {side}x{side} minimum this model can read (trained on {self.latent_size}x{self.latent_size})")
        if not torch.isfinite(latents).all():
            raise InputError(f"{name} contains NaN or infinite values; expected finite raw VAE latents")
        return latents

    def prepare_latents(self, latents: torch.Tensor, policy: str = "resize") -> torch.Tensor:
        """Bring latents to the model's device/dtype and, for policy "resize", the trained size."""
        if policy not in RESIZE_POLICIES:
            raise InputError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
        x = latents.to(device=self.device, dtype=self.input_dtype)
        h, w = x.shape[-2:]
        s = self.latent_size
        if policy == "resize" and (h, w) != (s, s):
            if h >= s and w >= s:
                x = F.adaptive_avg_pool2d(x, (s, s))
            else:
                # float32: antialiased bilinear has no bf16 kernel on CPU
                x = F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False,
                                  antialias=True).to(self.input_dtype)
        elif policy == "native" and (h % self.patch_size or w % self.patch_size):
            raise InputError(f"latents of {h}x{w} are not a multiple of the patch size {self.patch_size}; use policy 'resize'")
        return x

    def encode_latents(self, latents: torch.Tensor, policy: str = "resize", check: bool = True) -> torch.Tensor:
        """Image features [B, E] of raw VAE latents [B, C, H, W] or [B, C, 1, H, W] (not scaled)."""
        latents = self.check_latents(latents) if check else image_latents(latents)
        x = self.prepare_latents(latents, policy)
        if x.shape[-1] == self.latent_size and x.shape[-2] == self.latent_size:
            return self.clip.encode_image(x)
        return self._encode_native(x)

    def _encode_native(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        pos = visual.positional_embedding
        cls_pos, grid_pos = pos[:1], pos[1:]
        g = int(round(grid_pos.shape[0] ** 0.5))
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)
        original = visual.positional_embedding
        visual.positional_embedding = nn.Parameter(torch.cat([cls_pos, grid_pos]), requires_grad=False)
        try:
            return self.clip.encode_image(x)
        finally:
            visual.positional_embedding = original

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InputError("text is empty; expected at least one prompt")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"text #{i + 1} is empty or whitespace; expected a prompt")
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts) -> torch.Tensor:
        """Text features [N, E] for a list of strings (or an already tokenised LongTensor, on any device).

        Token ids outside the token table are refused here: on a GPU the embedding lookup would stop the
        whole process with a device-side assert instead of an error the node can report."""
        vocab = self.clip.token_embedding.num_embeddings
        if isinstance(texts, torch.Tensor):
            tokens = texts.to(self.device)
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
                raise InputError(f"text tokens must be ids in [0, {vocab - 1}] (text_cfg.vocab_size {vocab}), "
                                 f"got ids from {int(tokens.min())} to {int(tokens.max())}")
            return self.clip.encode_text(tokens)
        if vocab < len(self.tokenizer.encoder):
            raise InputError(f"this Latent-CLIP's text tower holds {vocab} tokens (text_cfg.vocab_size) but its "
                             f"tokenizer writes ids up to {len(self.tokenizer.encoder) - 1}, so it cannot encode "
                             f"text; expected a text tower of at least {len(self.tokenizer.encoder)} tokens")
        return self.clip.encode_text(self.tokenize(texts))

    def _text_weights_key(self) -> tuple:
        """Which text-tower tensors the model holds and how often each was written (storage and version counter
        of every parameter and buffer outside the image tower): ``load_state_dict`` on ``clip`` and optimiser
        steps write in place (the version changes), a swap makes a new tensor (the storage changes). Inference
        tensors keep no version; they cannot be written outside inference mode."""
        return tuple((name, t.data_ptr(), -1 if t.is_inference() else t._version)
                     for name, t in [*self.clip.named_parameters(), *self.clip.named_buffers()]
                     if not name.startswith("visual."))

    def encode_text_cached(self, texts) -> torch.Tensor:
        """Like ``encode_text`` without gradients, caching each prompt's features per model; the cache is
        forgotten when the text weights change (a fine-tuning loop scoring as it goes got the old features)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.tokenize(texts)  # validates
        key = self._text_weights_key()
        if key != self._text_cache_key:
            self._text_cache.clear()
            self._text_cache_key = key
        found = {t: self._text_cache[t] for t in dict.fromkeys(texts) if t in self._text_cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            with torch.no_grad():
                feats = self.encode_text(missing)
            new = {t: f.detach() for t, f in zip(missing, feats)}
            if len(self._text_cache) + len(missing) > 4096:
                self._text_cache.clear()   # `found` keeps this call's cached prompts
            self._text_cache.update(new)
            found.update(new)
        return torch.stack([found[t] for t in texts])

    def forward(self, latents: torch.Tensor, texts) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_latents(latents), self.encode_text(texts)
