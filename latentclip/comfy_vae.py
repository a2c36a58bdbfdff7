"""The user's VAE file, loaded and run by ComfyUI's own loader (the one edge of the core that imports comfy).

``python -m latentclip encode`` must make exactly the latents ComfyUI makes at generation time, for
every VAE architecture ComfyUI knows (SD1/SDXL, SD3/Flux, Wan 2.1/Qwen-Image, ...), so it does not
re-implement any: it finds a ComfyUI tree (``--comfyui`` or ``COMFYUI_PATH``), loads the file as the
VAELoader node does (``comfy.utils.load_torch_file`` then ``comfy.sd.VAE``) and encodes with
``VAE.encode``. comfy is imported lazily, on the first load.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .errors import InputError


def find_comfyui(path=None) -> Path:
    """The ComfyUI tree from ``path`` or COMFYUI_PATH; InputError when neither is one."""
    given = path or os.environ.get("COMFYUI_PATH")
    if not given:
        raise InputError("no ComfyUI tree given; pass --comfyui PATH or set COMFYUI_PATH (its VAE loader encodes the images)")
    root = Path(given).expanduser().resolve()
    if not (root / "comfy" / "sd.py").is_file():
        raise InputError(f"--comfyui {str(given)!r} is not a ComfyUI tree (no comfy/sd.py there)")
    return root


def _import_comfy(root: Path, device: torch.device):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options
    comfy.options.enable_args_parsing(False)  # our command line is not ComfyUI's
    from comfy.cli_args import args
    if device.type == "cpu":
        args.cpu = True
    elif device.type == "cuda" and device.index is not None:   # a bare "cuda" is the current device already
        torch.cuda.set_device(device)  # model management picks the current device
    import comfy.sd
    import comfy.utils
    return comfy


class ComfyVAE:
    """A VAE file loaded by ComfyUI: ``encode`` turns RGB images into the raw latents ComfyUI makes."""

    def __init__(self, path, comfyui=None, device: torch.device | str = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"VAE file '{self.path}' does not exist; expected a VAE from ComfyUI/models/vae")
        device = torch.device(device)
        comfy = _import_comfy(find_comfyui(comfyui), device)
        try:
            sd = comfy.utils.load_torch_file(str(self.path), safe_load=True)
            vae = comfy.sd.VAE(sd=sd, device=device)
        except Exception as e:  # noqa: BLE001 - the loader fails in many ways on a wrong file
            raise InputError(f"VAE file '{self.path.name}' could not be loaded by ComfyUI's VAE loader "
                             f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
        if vae.first_stage_model is None or vae.latent_dim not in (2, 3) or vae.output_channels != 3:
            raise InputError(f"VAE file '{self.path.name}' is not an image VAE ComfyUI recognises; expected a VAE "
                             "such as ComfyUI/models/vae/ae.safetensors")
        self.vae = vae
        self.channels = int(vae.latent_channels)
        self.dims = int(vae.latent_dim)
        self.factor = int(vae.spacial_compression_encode())

    def check_family(self, family) -> None:
        """InputError naming both when the file's latents are not ``family``'s (channels, factor, 2-D/3-D)."""
        mine = (self.channels, self.factor, self.dims)
        want = (family.channels, family.factor, family.dims)
        if mine != want:
            raise InputError(
                f"VAE file '{self.path.name}' makes {self.channels}-channel, {self.factor}x, {self.dims}-D latents but "
                f"family {family.name!r} has {family.channels}-channel, {family.factor}x, {family.dims}-D latents; "
                "pass the --family of this VAE or this family's VAE file")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C, h, w] of RGB images [B, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout).

        A 3-D (video) VAE reads a batch as frames of one video, so each image is encoded alone as a
        one-frame video and its frame axis dropped.
        """
        if self.dims == 2:
            return self.vae.encode(images).float().cpu()
        out = [self.vae.encode(img[None]).float().cpu() for img in images]
        return torch.cat([o[:, :, 0] for o in out])


#: Tensors that make ComfyUI's VAE loader pick each architecture (comfy/sd.py's detection), real size.
_ARCHITECTURE_KEYS = {
    # SD3 and FLUX.1 share one VAE architecture (16 channels, 8x); only their latent formats differ
    "sd3": {"decoder.conv_in.weight": (512, 16, 3, 3), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3)},
    "flux": {"decoder.conv_in.weight": (512, 16, 3, 3), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3)},
    "sdxl": {"decoder.conv_in.weight": (512, 4, 3, 3), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3)},
    "wan21": {"decoder.middle.0.residual.0.gamma": (384, 1, 1, 1)},
}


def random_vae_state_dict(architecture: str, comfyui=None, seed: int = 0) -> dict:
    """A randomly initialised VAE of a real architecture, built by ComfyUI's own classes (for CI and benchmarks).

    ComfyUI's loader builds the model the detection tensors select; its ops skip weight init, so every
    module is initialised with torch's own ``reset_parameters``.
    """
    comfy = _import_comfy(find_comfyui(comfyui), torch.device("cpu"))
    keys = _ARCHITECTURE_KEYS[architecture]
    vae = comfy.sd.VAE(sd={k: torch.zeros(shape) for k, shape in keys.items()}, device=torch.device("cpu"),
                       dtype=torch.float32)
    model = vae.first_stage_model
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for base in type(module).__mro__:
                if base.__module__.startswith("torch.nn.modules") and "reset_parameters" in vars(base):
                    base.reset_parameters(module)
                    break
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
