"""Real-size architectures with random weights for the timing runs.

Speed and memory do not depend on weight values, so every model here has the real layer layout and
sizes but random weights: Latent-CLIP from the project's configs, pixel CLIP from open_clip, and the
SDXL VAE decoder and diffusion UNets from ComfyUI's classes (``COMFYUI_PATH``) or, when no ComfyUI
tree is available, from diffusers (an optional, benchmark-only dependency).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

#: SDXL-VAE decoder (SD1.x/SDXL share the layout; SDXL uses it at 1/8 resolution, 4 channels).
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
SDXL_SCALE = 0.13025   # SDXL VAE scaling factor (raw latent = scaled / 0.13025)
SD21_SCALE = 0.18215

#: Full UNet configs in ComfyUI's UNetModel keyword form (the SDXL base and SD2.x layouts).
UNET_CONFIGS = {
    "sdxl": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True,
                 use_spatial_transformer=True, legacy=False, num_classes="sequential",
                 adm_in_channels=2816, use_checkpoint=False, use_temporal_attention=False,
                 use_temporal_resblock=False),
    "sd21": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 context_dim=1024, num_head_channels=64, use_linear_in_transformer=True,
                 use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_checkpoint=False,
                 use_temporal_attention=False, use_temporal_resblock=False),
}
UNET_NAMES = {"sdxl": "SDXL UNet", "sd21": "SD-Turbo UNet (SD2.1 arch)"}


# -- backend selection ---------------------------------------------------------------------------
_COMFY = None


def _comfy(device: str):
    """Import ComfyUI's model code from COMFYUI_PATH, telling it about a CPU-only machine first."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isdir(os.path.join(root, "comfy")):
        return None
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args
    if torch.device(device).type != "cuda":
        comfy.cli_args.args.cpu = True   # model_management probes CUDA at import otherwise
    if os.environ.get("LATENTCLIP_BENCH_ATTENTION") == "pytorch":   # what ComfyUI picks on CUDA
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules import model as vae_model
    from comfy.ldm.modules.diffusionmodules import openaimodel
    _COMFY = (comfy.ops, vae_model, openaimodel)
    return _COMFY


def backend(device: str) -> str:
    """Where the VAE/UNet classes come from: "comfyui", "diffusers", or "none" (latent path only)."""
    if _comfy(device) is not None:
        return "comfyui"
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "none"
    return "diffusers"


def _need_backend(device) -> bool:
    """True for ComfyUI, False for diffusers; a clear error when neither is there."""
    b = backend(str(device))
    if b == "none":
        raise RuntimeError("the VAE/UNet benchmarks need real classes: set COMFYUI_PATH to a ComfyUI tree "
                           "or `pip install diffusers` (benchmark-only, not a pack requirement)")
    return b == "comfyui"


def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every layer PyTorch's default random init (comfy.ops skips it and leaves memory garbage)."""
    torch.manual_seed(seed)
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(m)
                break
    return model


def _count(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _freeze(model: nn.Module, device, dtype) -> nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- VAE decoder -----------------------------------------------------------------------------------
class ComfyDecoder(nn.Module):
    """post_quant_conv + Decoder, the decode half of ComfyUI's AutoencoderKL for SDXL."""

    def __init__(self, vae_model):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.decoder = vae_model.Decoder(**VAE_DDCONFIG)

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class DiffusersDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


def vae_decoder(device, dtype):
    """SDXL-VAE decoder, random weights, frozen. Returns (module, source description)."""
    use_comfy = _need_backend(device)
    with torch.device(device):
        if use_comfy:
            m = init_random_(ComfyDecoder(_comfy(str(device))[1]))
            src = "comfy.ldm.modules.diffusionmodules.model.Decoder"
        else:
            m = init_random_(DiffusersDecoder())
            src = "diffusers.AutoencoderKL.decoder"
    m = _freeze(m, device, dtype)
    return m, f"{src} ({_count(m):.0f}M params)"


# -- UNet --------------------------------------------------------------------------------------------
class UNetCall(nn.Module):
    """eps = unet(x_t, t, text context [, SDXL pooled+size vector]) with one calling convention."""

    def __init__(self, unet, kind, flavour):
        super().__init__()
        self.unet, self.kind, self.flavour = unet, kind, flavour

    def forward(self, x, t, context, y=None):
        if self.flavour == "comfyui":
            return self.unet(x, timesteps=t, context=context, y=y)
        extra = None
        if y is not None:   # diffusers splits SDXL's 2816-d vector into pooled text (1280) + time ids (6)
            extra = {"text_embeds": y[:, :1280], "time_ids": y[:, 1280:1286]}
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample


def _diffusers_unet(kind):
    from diffusers import UNet2DConditionModel
    if kind == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def unet(kind, device, dtype):
    """Diffusion UNet of ``kind`` ("sdxl" or "sd21"), random weights, frozen."""
    if _need_backend(device):
        ops, _, openaimodel = _comfy(str(device))
        cfg = dict(UNET_CONFIGS[kind], dtype=torch.float32)
        with torch.device(device):   # build and initialise where it runs: fast on a GPU
            net = init_random_(openaimodel.UNetModel(**cfg, operations=ops.disable_weight_init))
        flavour, src = "comfyui", "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel"
    else:
        with torch.device(device):
            net = init_random_(_diffusers_unet(kind))
        flavour, src = "diffusers", "diffusers.UNet2DConditionModel"
    net = _freeze(net, device, dtype)
    return UNetCall(net, kind, flavour), f"{UNET_NAMES[kind]}: {src} ({_count(net):.0f}M params)"


def unet_inputs(kind, device, dtype):
    """Random conditioning the UNet needs: text context and, for SDXL, the 2816-d adm vector."""
    g = torch.Generator().manual_seed(1)
    ctx_dim = UNET_CONFIGS[kind]["context_dim"]
    context = torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype)
    y = None
    if kind == "sdxl":
        y = torch.randn(1, 2816, generator=g).to(device, dtype)
    return context, y


# -- CLIPs -------------------------------------------------------------------------------------------
def latent_clip(name, device, dtype):
    from latentclip.model import LatentCLIP
    torch.manual_seed(0)
    with torch.device(device):
        m = _freeze(LatentCLIP(name), device, dtype)
    return m, f"latentclip.model.LatentCLIP('{name}') ({_count(m.clip.visual):.0f}M vision params)"


def pixel_clip(name, device, dtype):
    import open_clip
    torch.manual_seed(0)
    with torch.device(device):
        m = _freeze(open_clip.create_model(name, pretrained=None, device=device), device, dtype)
    return m, f"open_clip.create_model('{name}') ({_count(m.visual):.0f}M vision params)"
