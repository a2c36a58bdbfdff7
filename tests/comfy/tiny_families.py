"""Tiny random diffusion models of 16-channel VAE families, built by ComfyUI's own classes.

Flux (``comfy.supported_models.Flux``: ``comfy.ldm.flux``), SD3 (``comfy.supported_models.SD3``: MMDiT)
and Wan 2.1 (``comfy.supported_models.WAN21_T2V``: ``comfy.ldm.wan``, 3-D latents) with tiny widths, so a
real sampler runs on their latents in about a second on CPU; their ``latent_format`` is ComfyUI's Flux /
SD3 / Wan21, as for the real checkpoints. Also the random
16-channel Latent-CLIPs of those families. Used in-process and by the families fixture pack.
"""
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONTEXT, POOLED = 64, 32   # text context width and pooled vector width of the tiny models' CONDITIONING
ARCHITECTURES = ("flux", "sd3", "wan21")


def _harness():
    name = "latentclip_tests_comfy_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _flux_config():
    import comfy.supported_models
    return comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED, "context_in_dim": CONTEXT,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True})


def _sd3_config():
    import comfy.supported_models
    return comfy.supported_models.SD3({
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None,
        "adm_in_channels": POOLED, "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT, "out_features": 64}},
        "x_block_self_attn_layers": []})


def _wan21_config():
    import comfy.supported_models
    return comfy.supported_models.WAN21_T2V({
        "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 4, "num_layers": 1,
        "text_dim": CONTEXT, "freq_dim": 32, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2)})


def tiny_dit(architecture: str, seed: int = 0):
    """A ModelPatcher around a tiny random Flux-, SD3- or Wan-2.1-architecture model (float32)."""
    cfg = {"flux": _flux_config, "sd3": _sd3_config, "wan21": _wan21_config}[architecture]()
    cfg.set_inference_dtype(torch.float32, None)
    patcher = _harness().tiny_model_patcher(cfg, seed)
    if architecture == "sd3":  # MMDiT's pos_embed is a buffer made with torch.empty (a checkpoint fills it)
        import numpy as np
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
        pos = patcher.model.diffusion_model.pos_embed
        table = get_2d_sincos_pos_embed(pos.shape[-1], int(round(pos.shape[1] ** 0.5)))
        with torch.inference_mode():
            pos.copy_(torch.from_numpy(np.asarray(table, dtype=np.float32)).view(pos.shape))
    return patcher


def tiny_dit_conditioning(seed: int = 0, batch: int = 1):
    """CONDITIONING for tiny_dit: [[text context [B, 77, 64], {"pooled_output": [B, 32]}]]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, CONTEXT, generator=g), {"pooled_output": torch.randn(batch, POOLED, generator=g)}]]


def tiny_family_latent_clip(family: str, seed: int = 0):
    """The harness's tiny random Latent-CLIP retargeted to ``family`` (its channels, factor, metadata)."""
    from latentclip import configs
    return _harness().tiny_latent_clip(seed=seed, cfg=configs.for_family("Latent-ViT-Tiny-test", family))
