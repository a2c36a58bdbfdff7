"""The mini VAE: 64x64x3 images <-> 8x8x4 raw latents (factor 8, 4 channels, as SDXL's VAE).

Its raw latents (the posterior mean) are the mini-world's latent space: the Latent-CLIP reads them
as they are. ``scale_factor`` (1 / std of raw latents over the training stream, like SDXL's 0.13025)
is only for generators that want unit-variance latents; ``latent_mean``/``latent_std`` give the
per-channel statistics as well. Decoding is differentiable (ReNO's pixel reward backpropagates
through it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..checkpoints import write_safetensors
from ..errors import InputError
from .files import build_from_metadata, read_tagged

LATENT_CHANNELS = 4
FACTOR = 8


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class MiniVAE(nn.Module):
    """KL-regularised conv autoencoder; images are NCHW floats in [0, 1]."""

    def __init__(self, channels=(32, 64, 96), latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        c1, c2, c3 = channels
        self.channels = tuple(channels)
        self.latent_channels = int(latent_channels)
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, c1, 3, padding=1), ResBlock(c1),      # 32x32
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), ResBlock(c2),                   # 16x16
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), ResBlock(c3), nn.SiLU(),        # 8x8
            nn.Conv2d(c3, 2 * self.latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(self.latent_channels, c3, 3, padding=1), ResBlock(c3),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c3, c2, 3, padding=1), ResBlock(c2),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c1, 3, padding=1), ResBlock(c1), nn.SiLU(),
            nn.Conv2d(c1, 12, 3, padding=1), nn.PixelShuffle(2))
        self.register_buffer("latent_mean", torch.zeros(self.latent_channels))
        self.register_buffer("latent_std", torch.ones(self.latent_channels))
        self.register_buffer("scale", torch.ones(()))

    @property
    def scale_factor(self) -> float:
        """Multiply raw latents by this for unit variance (what SDXL calls 0.13025)."""
        return float(self.scale)

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (3, 64, 64):
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a tensor [batch, 3, 64, 64] with values in [0, 1], got {shape}")

    def posterior(self, images: torch.Tensor):
        """Mean and log-variance [B, C, 8, 8] of q(z | image) (C = ``latent_channels``)."""
        self._check_images(images)
        h = self.encoder(images.to(self.scale.dtype) * 2 - 1)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-12, 6)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Raw latents [B, C, 8, 8]: the posterior mean, or a sample when ``sample``."""
        mean, logvar = self.posterior(images)
        if not sample:
            return mean
        return mean + _noise_like(mean, generator) * (0.5 * logvar).exp()

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images [B, 3, 64, 64] in [0, 1] from raw latents; differentiable."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"latents must be a tensor [batch, {self.latent_channels}, 8, 8] of raw mini-VAE latents, "
                             f"got {shape}")
        x = (self.decoder(latents) + 1) / 2
        return x.clamp(0, 1) if clamp else x

    def loss(self, images: torch.Tensor, kl_weight: float, edge_weight: float = 0.0, generator=None):
        """Per-image summed squared error + ``kl_weight`` * KL, averaged over the batch.

        ``edge_weight`` adds that much weight on pixels at object outlines: corners and edges are
        few pixels but carry the shape (a square's corners are what tell it from a circle).
        Returns (loss, plain summed squared error, KL).
        """
        mean, logvar = self.posterior(images)
        z = mean + _noise_like(mean, generator) * (0.5 * logvar).exp()
        rec = self.decode(z, clamp=False)
        err = (rec - images) ** 2
        mse = err.flatten(1).sum(1).mean()
        weighted = mse
        if edge_weight:
            with torch.no_grad():
                obj = ((images.amax(1, keepdim=True) - images.amin(1, keepdim=True)) > 0.3).float()
                edge = F.max_pool2d(obj, 3, 1, 1) - (-F.max_pool2d(-obj, 3, 1, 1))
            weighted = (err * (1 + edge_weight * edge)).flatten(1).sum(1).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        return weighted + kl_weight * kl, mse, kl

    @torch.no_grad()
    def set_latent_stats(self, latents: torch.Tensor) -> None:
        self.latent_mean.copy_(latents.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(latents.std(dim=(0, 2, 3)))
        self.scale.copy_(1.0 / latents.std())


def _noise_like(t: torch.Tensor, generator=None) -> torch.Tensor:
    """Gaussian noise shaped like ``t`` on its device, drawn where ``generator`` lives (a seeded CPU
    generator gives the same draws whether the VAE is on the CPU or a GPU)."""
    device = generator.device if generator is not None else t.device
    return torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype).to(t.device)


def save_vae(vae: MiniVAE, path, extra: dict | None = None) -> Path:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    meta = {"format": "latentclip-mini-vae", "channels": json.dumps(list(vae.channels)),
            "scale_factor": repr(vae.scale_factor), **(extra or {})}
    if vae.latent_channels != LATENT_CHANNELS:  # the 4-channel file keeps its original metadata
        meta["latent_channels"] = str(vae.latent_channels)
    write_safetensors({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, path, meta)
    return path


def load_vae(path, device="cpu") -> MiniVAE:
    """Read a mini VAE written by ``save_vae``."""
    sd, meta = read_tagged(path, "latentclip-mini-vae", "mini VAE")
    try:
        latent_channels = int(meta.get("latent_channels", LATENT_CHANNELS))
    except ValueError:
        latent_channels = -1
    if not 1 <= latent_channels <= 64:
        from ..errors import CheckpointError
        raise CheckpointError(f"'{Path(path).name}' has a metadata 'latent_channels' "
                              f"{meta.get('latent_channels')!r}; expected an integer in [1, 64]")
    vae = build_from_metadata(path, meta, "channels", sd, "mini VAE", lambda c: MiniVAE(tuple(c), latent_channels))
    return vae.to(device).eval().requires_grad_(False)


def images_to_tensor(images) -> torch.Tensor:
    """uint8 [N, 64, 64, 3] numpy images -> float NCHW in [0, 1].

    Anything else is refused: float images would be divided by 255 again, in the caller's own array."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        what = f"{images.dtype} array {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"images must be a uint8 numpy array [N, 64, 64, 3] (0-255), got a {what}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
