"""Pre-encoding throughput: images per second of ``python -m latentclip encode`` itself (the user's command:
JPEG decode, ComfyUI's VAE loader and encode, the teacher's embedding, shard writing), on randomly
initialised real-architecture VAEs (ComfyUI's own classes) and open_clip teachers; the time does not
depend on the weights. Prints a table; the rate is measured between the first and the last shard, so the
first shard (model loading, kernel warm-up) is left out.

    python -m benchmarks.encode_throughput --device cuda --cases flux:ViT-B-32:512,flux:ViT-L-14:256 --json OUT
    python -m benchmarks.encode_throughput --device cpu --cases flux:ViT-B-32:6 --size 64 --batch 2 --shard-size 2

A case is VAE_ARCHITECTURE:TEACHER:IMAGES[:WORKERS] (architectures: latentclip.comfy_vae.random_vae_state_dict's;
WORKERS: the CLI's --workers, decoding threads, default --workers).
Needs COMFYUI_PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import overwrite_refusal  # noqa: E402
from latentclip.families import get_family  # noqa: E402

#: The families whose VAE architectures ``random_vae_state_dict`` builds, by architecture name.
FAMILY_OF = {"flux": "flux", "sd3": "sd3", "wan21": "wan21", "sdxl": "sdxl"}


def _images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth random colour fields, quality 90) of ``size`` pixels."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        low = rng.random((8, 8, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text("a photo")


def _weights(root: Path, architecture: str, teacher: str) -> tuple[Path, Path]:
    import logging
    from safetensors.torch import save_file
    import open_clip
    from latentclip.comfy_vae import random_vae_state_dict
    logging.disable(logging.WARNING)   # ComfyUI lists the keys a zero-filled detection dict lacks
    vae = root / f"vae-{architecture}.safetensors"
    if not vae.exists():
        save_file(random_vae_state_dict(architecture), str(vae))
    t = root / f"teacher-{teacher}.safetensors"
    if not t.exists():
        torch.manual_seed(0)
        model = open_clip.create_model(teacher, pretrained=None)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(t))
    return vae, t


def run_case(root: Path, architecture: str, teacher: str, n: int, size: int, batch: int, shard_size: int,
             device: str, workers: int = 4) -> dict:
    """Encode ``n`` images with the CLI; images/s between the first and the last shard's log line."""
    vae, t = _weights(root, architecture, teacher)
    images = root / f"images-{size}-{n}"
    if not images.exists():
        _images(images, n, size)
    out = root / f"shards-{architecture}-{teacher}-{n}-w{workers}"
    cmd = [sys.executable, "-m", "latentclip", "encode", str(images), "--out", str(out), "--vae", str(vae),
           "--family", FAMILY_OF[architecture], "--teacher", str(t), "--teacher-model", teacher, "--size", str(size),
           "--batch", str(batch), "--shard-size", str(shard_size), "--device", device, "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    marks, tail = [], []
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-5:]
        m = re.search(r"\((\d+) images\) (\d+)/(\d+) shards", line)
        if m:
            marks.append((time.perf_counter(), int(m.group(1))))
    if proc.wait():
        raise SystemExit(f"encode failed for {architecture}/{teacher}: " + " | ".join(tail))
    total = time.perf_counter() - t0
    row = {"vae": architecture, "teacher": teacher, "images": n, "size": size, "batch": batch, "workers": workers,
           "device": device,
           "wall_s": round(total, 2), "shards": len(marks)}
    if len(marks) >= 2:
        timed = sum(k for _, k in marks[1:])
        row["images_per_s"] = round(timed / (marks[-1][0] - marks[0][0]), 2)
        row["timed_images"] = timed
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encode_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="flux:ViT-B-32:512", help="comma-separated VAE_ARCHITECTURE:TEACHER:IMAGES[:WORKERS]")
    p.add_argument("--workers", type=int, default=4, help="the CLI's --workers for cases that name none")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--json", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    args = p.parse_args(argv)
    cases = []
    for c in args.cases.split(","):
        parts = c.split(":")
        if len(parts) not in (3, 4) or parts[0] not in FAMILY_OF or not all(x.isdigit() for x in parts[2:]):
            p.error(f"--cases: {c!r} is not VAE_ARCHITECTURE:TEACHER:IMAGES[:WORKERS] with an architecture of "
                    f"{', '.join(FAMILY_OF)} and whole numbers of images and workers")
        cases.append((parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else args.workers))
    refusal = overwrite_refusal(args.json, args.overwrite)
    if refusal:
        p.error(refusal)
    for arch, _, _, _ in cases:
        get_family(FAMILY_OF[arch])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, teacher, n, workers in cases:
            rows.append(run_case(Path(tmp), arch, teacher, n, args.size, args.batch, args.shard_size, args.device, workers))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    print(f"device={args.device} ({name}), torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print("| VAE | teacher | size | batch | decoding threads | images timed | images/s | device hours for 10M images | for 100M |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ips = r.get("images_per_s")
        hours = (f"{1e7 / ips / 3600:.1f} | {1e8 / ips / 3600:.1f}" if ips else "- | -")
        print(f"| {r['vae']} | {r['teacher']} | {r['size']} | {r['batch']} | {r['workers']} | {r.get('timed_images', 0)} | "
              f"{ips} | {hours} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "name": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
