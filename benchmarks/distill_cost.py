"""What distilling a Latent-CLIP costs: seconds per training sample of the real trainer, and per encoded image.

``python -m benchmarks.distill_cost [--configs mini,Latent-ViT-B-8-512,...] [--steps 4] [--encode]``

Training: ``latentclip.train.distill.run`` itself (one process, on the CPU) on synthetic
shards of 16-channel latents (64x64x16 for the 512-pixel configs, 8x8x16 for the mini-world's), with
a randomly initialised teacher of the right text tower (ViT-B-32 for the B configs), cosine loss and
with the caption-contrastive term. The first step is warm-up; the rest are timed from the trainer's
own log (wall and process CPU seconds). Encoding (``--encode``, needs COMFYUI_PATH): one 512-pixel
image through a real-size SD3/Flux-architecture VAE loaded by ComfyUI, and the ViT-B-32 teacher.
Projections scale the per-sample cost linearly (no data loading, no multi-process overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import overwrite_refusal

#: name -> (student config, teacher open_clip name or None for the mini teacher, latent side, batch)
CASES = {
    "mini": ("mini-latent", None, 8, 32),
    "Latent-ViT-B-8-512": ("Latent-ViT-B-8-512", "ViT-B-32", 64, 8),
    "Latent-ViT-B-4-512": ("Latent-ViT-B-4-512", "ViT-B-32", 64, 4),
}


def _teacher(name):
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from latentclip.configs import get_config
    from latentclip.train.distill import Teacher
    torch.manual_seed(0)
    if name:
        return Teacher(open_clip.create_model(name, pretrained=None).eval(), name, open_clip.get_model_config(name))
    cfg = get_config("mini-latent")  # the mini pixel CLIP's towers: a 3-channel twin of the mini Latent-CLIP
    vision = {**{k: v for k, v in cfg["vision_cfg"].items() if k not in ("latent_factor", "latent_channels")},
              "patch_size": 8}
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**vision), CLIPTextCfg(**cfg["text_cfg"]))
    return Teacher(model.eval(), "mini-teacher", {"embed_dim": cfg["embed_dim"], "vision_cfg": vision,
                                                   "text_cfg": cfg["text_cfg"]})


def _shards(folder: Path, teacher, side: int, n: int) -> Path:
    from latentclip.train.shards import FORMAT, MANIFEST, Sample, write_shard
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    dim = teacher.config["embed_dim"]
    write_shard(folder / "000000.tar", [Sample(f"{i:06d}", rng.standard_normal((16, side, side)).astype(np.float32),
                                               rng.standard_normal(dim).astype(np.float32), f"a photo of thing {i}")
                                        for i in range(n)])
    (folder / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "version": 1, "family": "flux", "vae": "synthetic", "image_size": side * 8,
        "latent_shape": [16, side, side], "teacher": {"model": teacher.name, "file": "-", "embed_dim": dim}}))
    return folder


def train_cost(case: str, steps: int, contrastive: float, root: Path, device: str = "cpu", batch: int = 0) -> dict:
    from latentclip.train.distill import LOG_FILE, Settings, run
    config, teacher_name, side, case_batch = CASES[case]
    batch = batch or case_batch
    teacher = _teacher(teacher_name)
    data = _shards(root / f"{case}-{contrastive}-data", teacher, side, batch * (steps + 1))
    work = root / f"{case}-{contrastive}-work"
    s = Settings(data=str(data), teacher="", out=str(root / f"{case}-{contrastive}.safetensors"), work=str(work),
                 config=config, batch=batch, steps=steps + 1, warmup=1, log_every=1, contrastive_weight=contrastive,
                 device=device)   # explicit: left unset, the trainer picks a GPU when there is one
    run(s, teacher=teacher, log=lambda m: None)
    log = [json.loads(line) for line in (work / LOG_FILE).read_text().splitlines()]
    timed = (len(log) - 1) * batch
    return {"case": case, "latent": f"{side}x{side}x16", "batch": batch, "contrastive": contrastive,
            "wall_s_per_sample": (log[-1]["wall_s"] - log[0]["wall_s"]) / timed,
            "cpu_s_per_sample": (log[-1]["cpu_s"] - log[0]["cpu_s"]) / timed}


def encode_cost(root: Path, size: int = 512) -> dict:
    from safetensors.torch import save_file
    from latentclip.comfy_vae import ComfyVAE, random_vae_state_dict
    from latentclip.encode import Teacher as PixelTeacher
    import open_clip
    import logging
    logging.disable(logging.WARNING)
    save_file({k: v.half() for k, v in random_vae_state_dict("flux").items()}, str(root / "vae.safetensors"))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "t.safetensors"))
    vae = ComfyVAE(root / "vae.safetensors")
    teacher = PixelTeacher(root / "t.safetensors", "ViT-B-32", torch.device("cpu"))
    image = torch.rand(1, size, size, 3)
    out = {}
    for name, fn in (("vae_encode", lambda: vae.encode(image)), ("teacher_embed", lambda: teacher.embed(image))):
        fn()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_cost", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--encode", action="store_true", help="also time encoding one 512-pixel image (COMFYUI_PATH)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.add_argument("--device", default="cpu", help="cpu (the table: CPU seconds) or cuda (wall seconds, samples/s, "
                   "GPU hours)")
    p.add_argument("--batch", type=int, default=0, help="per-step batch of every config (0: each config's own, sized "
                   "for a CPU)")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CASES]
    if unknown:
        p.error(f"--configs: {', '.join(map(repr, unknown))} unknown; expected some of {', '.join(CASES)}")
    if args.steps < 1:   # one warm-up step alone leaves nothing timed
        p.error(f"--steps {args.steps}: expected at least 1")
    if args.batch < 0:
        p.error(f"--batch {args.batch}: expected 0 (each config's own) or more")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    refusal = overwrite_refusal(args.json, args.overwrite)
    if refusal:
        p.error(refusal)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.configs.split(","):
            for contrastive in (0.0, 0.5):
                rows.append(train_cost(case, args.steps, contrastive, Path(tmp), args.device, args.batch))
        encode = encode_cost(Path(tmp)) if args.encode else None
    gpu = args.device != "cpu"   # on a GPU the CPU seconds are the host's share; what counts is wall time
    name = torch.cuda.get_device_name(torch.device(args.device)) if gpu else None
    print(f"device={args.device} ({name}), torch {torch.__version__}" if gpu
          else f"threads={torch.get_num_threads()} device=cpu (no GPU measured)")
    print(_table(rows, gpu))
    if encode:
        for name, t in encode.items():
            print(f"encode, 512 px, {name}: {t['cpu_s']:.2f} CPU s ({t['wall_s']:.2f} s wall) per image")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "name": name, "train": rows, "encode": encode},
                                              indent=1))
    return 0


def _table(rows: list, gpu: bool) -> str:
    """Markdown rows: CPU seconds and core-hours on the CPU; wall seconds, samples/s and GPU hours on a GPU."""
    head = (["wall s / sample", "samples/s", "GPU hours, 10M samples", "100M samples"] if gpu else
            ["CPU s / sample", "wall s / sample", "CPU core-hours, 10M samples", "100M samples"])
    lines = ["| config | latent | batch | loss | " + " | ".join(head) + " |", "|---" * 8 + "|"]
    for r in rows:
        loss = "cosine + contrastive" if r["contrastive"] else "cosine"
        w, c = r["wall_s_per_sample"], r["cpu_s_per_sample"]
        cells = ([f"{w:.6f}", f"{1 / w:,.0f}", f"{w * 1e7 / 3600:,.1f}", f"{w * 1e8 / 3600:,.1f}"] if gpu else
                 [f"{c:.4f}", f"{w:.4f}", f"{c * 1e7 / 3600:,.0f}", f"{c * 1e8 / 3600:,.0f}"])
        lines.append(f"| {r['case']} | {r['latent']} | {r['batch']} | {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
