"""The weights manifest: for each shipped file its sha256, what it is, how it was trained, its scores."""
from __future__ import annotations

import hashlib
import json
import platform
import struct
from pathlib import Path

import torch

DESCRIPTIONS = {
    "mini-vae.safetensors": "mini VAE: 64x64x3 images <-> 8x8x4 raw latents (KL-regularised, factor 8); "
                            "read with latentclip.miniworld.vae.load_vae",
    "mini-latent-clip.safetensors": "mini Latent-CLIP on raw mini-VAE latents (VAE family 'mini'); "
                                    "read with latentclip.load",
    "mini-pixel-clip.safetensors": "mini pixel CLIP (open_clip ViT on 64x64 RGB), the reference and pixel reward; "
                                   "read with latentclip.miniworld.clips.load_pixel_clip",
}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(path) -> str:
    """sha256 of a safetensors file's header (keys sorted) and tensor bytes.

    safetensors writes its metadata map in hash order, so two runs of one seed give files whose bytes
    differ while every tensor and metadata value is identical; this hash tells the two cases apart.
    """
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = hashlib.sha256(json.dumps(json.loads(f.read(n)), sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def portable(value, root):
    """``value`` with every string naming a path under ``root`` made relative to it: a manifest records
    ``weights/mini/...``, never the folder of the machine that trained it."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    prefix = str(Path(root).resolve()) + "/"
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix):]
    return value


def file_entry(path, what: str) -> dict:
    """One ``files`` row of the manifest."""
    path = Path(path)
    return {"file": path.name, "sha256": sha256(path), "content_sha256": content_sha256(path),
            "bytes": path.stat().st_size, "what": what}


def write_manifest(directory, seed: int, recipe: dict, info: dict, scores: dict | None) -> Path:
    directory = Path(directory)
    files = [file_entry(directory / name, what) for name, what in DESCRIPTIONS.items() if (directory / name).is_file()]
    manifest = {
        "files": files,
        "trained_with": {"command": f"python -m latentclip.miniworld train --seed {seed}", "seed": seed,
                         "recipe": recipe, "torch": torch.__version__, "python": platform.python_version(),
                         "machine": f"{platform.machine()} CPU, {recipe['threads_per_worker']} torch thread per worker, "
                                    "2 workers (VAE, then Latent-CLIP | pixel CLIP, then generator)",
                         "timings": info},
        "scores": scores,
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
