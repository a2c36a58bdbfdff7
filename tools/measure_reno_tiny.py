"""Measure ReNO inside an in-process ComfyUI on tiny models: latent vs pixel reward.

    COMFYUI_PATH=/path/to/ComfyUI python tools/measure_reno_tiny.py [--iterations 10] [--size 64]

Tiny SDXL-architecture UNet (random weights, inference tensors as a loader makes them), the tiny
Latent-CLIP test config, and for the pixel path a TAESD-architecture ComfyUI VAE plus open_clip
ViT-S-32. Prints the reward loss before/after and seconds per iteration for each reward. Timings
on tiny random models show the mechanics and the relative cost, not real SDXL numbers (see
benchmarks/ for real architectures).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import conftest as harness
    import latentclip
    import open_clip
    from test_reno_nodes import tiny_taesd_vae

    if harness.COMFYUI is None:
        raise SystemExit(harness.SKIP_REASON)
    comfy = harness.Comfy(harness.COMFYUI, Path(tempfile.mkdtemp(prefix="lc-measure-")))
    model = harness.tiny_latent_clip(seed=3)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    latentclip.save(model, comfy.models / "latent_clip" / "tiny.safetensors")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(),
               comfy.models / "open_clip" / "open_clip_pytorch_model.bin")
    handle = comfy.run_node("LatentCLIPLoader", ckpt_name="tiny.safetensors", device="cpu", dtype="fp32").result[0]
    prompt = "a red fox in the snow"
    rewards = {
        "latent": comfy.run_node("LatentCLIPReward", latent_clip=handle, text=prompt, mode="match", weight=0.01).result[0],
        "pixel": comfy.run_node("PixelCLIPReward", clip_name="open_clip_pytorch_model.bin", model_name="",
                                vae=tiny_taesd_vae(), text=prompt, weight=0.01).result[0],
    }
    unet = harness.tiny_sdxl()
    rows = []
    for name, reward in rewards.items():
        start = time.perf_counter()
        out = comfy.run_node("LatentCLIPReNO", model=unet, positive=harness.tiny_conditioning(1), negative=harness.tiny_conditioning(2),
                             latent_image={"samples": torch.zeros(1, 4, args.size, args.size)}, reward=reward, seed=0,
                             iterations=args.iterations, learning_rate=5.0, optimizer="sgd", grad_clip=0.1,
                             regularization=0.01, steps=1, cfg=1.0)
        wall = time.perf_counter() - start
        summary = json.loads(out.result[2])
        rows.append({"reward": name, "loss_before": summary["initial_loss"][0], "loss_best": summary["best_loss"][0],
                     "best_iteration": summary["best_iteration"][0], "s_per_iteration": summary["seconds_per_iteration"],
                     "wall_s": wall})
    print(f"tiny SDXL UNet, latent {args.size}x{args.size}, {args.iterations} iterations, torch threads {args.threads}")
    print(f"{'reward':8} {'loss before':>12} {'loss best':>10} {'best it':>8} {'s/iter':>8}")
    for r in rows:
        print(f"{r['reward']:8} {r['loss_before']:12.4f} {r['loss_best']:10.4f} {r['best_iteration']:8d} {r['s_per_iteration']:8.3f}")
    ratio = rows[0]["s_per_iteration"] / rows[1]["s_per_iteration"]
    print(f"latent/pixel time per iteration: {ratio:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
