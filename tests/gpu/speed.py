"""The speeds users compare, on real-size architectures with random weights (time does not depend on
the weights), in the dtype ComfyUI picks on CUDA (fp16 UNet), for tests/gpu/run.sh:

1. ReNO: seconds per iteration of a one-step SDXL-architecture UNet at 512 px with the Latent-CLIP
   reward (Latent-ViT-B-8-512, no decode) and with the pixel reward (SDXL-VAE decode + ViT-H-14), and
   the projected seconds per image for 50 iterations (the paper reports 9.01 s per image with its
   Latent-CLIP reward on SDXL-Turbo).
2. fp16 noise gradients: how many entries of the noise gradient are zero or non-finite after the
   iterations above (an fp16 UNet backward can underflow or overflow).
3. One FK search (latentclip.search, lambda 30, resampling every step from auto start) of 8
   particles x 20 Euler steps at 1024 px with each reward, every particle's x0 scored at every step.

    python tests/gpu/speed.py --device cuda --json OUT.json
    python tests/gpu/speed.py --device cpu --small      # the dry run: a narrow SD2.1-layout UNet, 128 px, 2 x 2, ViT-B-32
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import arch  # noqa: E402
from benchmarks.cases import LatentReward, PixelReward, RenoStep, _sync  # noqa: E402
from latentclip.search import SearchSettings, auto_start, search  # noqa: E402


def reno_speed(kind, px, reward, device, dtype, iterations):
    """Median seconds per ReNO iteration, and the noise gradient's zero / non-finite entry counts."""
    unet = CACHE["unet"]
    step = RenoStep(unet, kind, px // 8, reward, device, dtype)
    times, zero, bad = [], 0, 0
    original_step = step.opt.step

    def counting_step():   # look at the gradient ReNO is about to use (after clipping)
        nonlocal zero, bad
        g = step.z.grad
        zero += int((g == 0).sum())
        bad += int((~torch.isfinite(g)).sum())
        original_step()
    step.opt.step = counting_step
    for i in range(iterations + 1):   # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"s_per_iteration": statistics.median(times), "grad_entries": step.z.numel() * (iterations + 1),
            "grad_zero": zero, "grad_nonfinite": bad}


def row_rewards(reward, raw):
    """Per-row ``exp(logit_scale) * cos`` of raw latents [M, 4, h, w] (the rewards' own models)."""
    with torch.no_grad():
        if isinstance(reward, LatentReward):
            img = reward.model.encode_latents(raw)
        else:
            rows = []
            for i in range(raw.shape[0]):   # one decode at a time, as a pixel verifier must at 1024 px
                x = ((reward.decoder(raw[i:i + 1]) + 1) / 2).clamp(0, 1)
                x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
                rows.append(reward.model.encode_image((x - reward.mean) / reward.std))
            img = torch.cat(rows)
        return reward.scale * (F.normalize(img.float(), dim=-1) * reward.text).sum(-1)


def fk_search(kind, px, reward, device, dtype, particles, steps):
    """Wall seconds of one FK search with Euler steps on a Karras-like sigma ladder, and its best reward."""
    unet = CACHE["unet"]
    context, y = arch.unet_inputs(kind, device, dtype)
    scale = arch.SDXL_SCALE if kind == "sdxl" else arch.SD21_SCALE
    sigmas = torch.linspace(14.6146 ** (1 / 7), 0.0292 ** (1 / 7), steps).pow(7).tolist() + [0.0]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(particles, 4, px // 8, px // 8, generator=g) * sigmas[0]).to(device, dtype)
    ctx, yy = context.expand(particles, -1, -1), None if y is None else y.expand(particles, -1)

    def advance(x, a, b):
        x0s = []
        for i in range(a, b):
            s, s_next = sigmas[i], sigmas[i + 1]
            t = torch.full((x.shape[0],), 999.0 * i / steps, device=device, dtype=dtype)
            with torch.no_grad():
                eps = unet(x / (s ** 2 + 1) ** 0.5, t, ctx[:x.shape[0]], None if yy is None else yy[:x.shape[0]])
            x0 = x - s * eps
            x0s.append(x0 / scale)
            x = x0 + (x - x0) * (s_next / s)
        return x, x0s

    settings = SearchSettings(strategy="fk_steering", particles=particles, temperature=30.0, interval=1,
                              start=auto_start(steps), seed=0)
    _sync(device)
    t0 = time.perf_counter()
    result = search(advance, x, steps, lambda lat: (row_rewards(reward, lat), {}), 1, settings)
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "model_calls": result.particle_steps, "best_reward": result.best_reward[0]}


CACHE: dict = {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true",
                    help="dry-run sizes (CPU): a narrow SD2.1-layout UNet, 128 px, 2 particles x 2 steps, ViT-B-32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    small = a.small
    kind = "sdxl"
    if small:   # the code path, not the speed: SD2.1's layout at 1/10 of its width
        kind = "sd21"
        arch.UNET_CONFIGS[kind] = dict(arch.UNET_CONFIGS[kind], model_channels=32, num_head_channels=16)
    dtype = torch.float32 if device.type == "cpu" else torch.float16   # ComfyUI's pick for SDXL on CUDA
    reno_px, fk_px = (128, 128) if small else (512, 1024)
    iterations, particles, steps = (2, 2, 2) if small else (10, 8, 20)
    latent_name, pixel_name = "Latent-ViT-B-8-512", ("ViT-B-32" if small else "ViT-H-14")
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    CACHE["unet"], unet_src = arch.unet(kind, device, dtype)
    rewards = {"latent": LatentReward(latent_name, device, dtype), "pixel": PixelReward(pixel_name, device, dtype)}
    out = {"device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"), "dtype": str(dtype),
           "torch": torch.__version__, "unet": unet_src, "reno_px": reno_px, "fk_px": fk_px, "reno": {}, "fk": {}}
    for name, reward in rewards.items():
        r = reno_speed(kind, reno_px, reward, device, dtype, iterations)
        r["projected_s_per_image_50_iterations"] = 50 * r["s_per_iteration"]
        r["source"] = reward.source
        out["reno"][name] = r
        print(f"ReNO {name}: {r['s_per_iteration']:.3f} s/iteration at {reno_px} px -> "
              f"{r['projected_s_per_image_50_iterations']:.1f} s per image for 50 iterations; noise gradient "
              f"zero {r['grad_zero']}/{r['grad_entries']}, non-finite {r['grad_nonfinite']}", flush=True)
    for name, reward in rewards.items():
        r = fk_search(kind, fk_px, reward, device, dtype, particles, steps)
        out["fk"][name] = r
        print(f"FK search {name}: {particles} particles x {steps} steps at {fk_px} px: {r['seconds']:.2f} s "
              f"({r['model_calls']} UNet calls)", flush=True)
    lat, pix = out["reno"]["latent"]["s_per_iteration"], out["reno"]["pixel"]["s_per_iteration"]
    out["reno_latent_over_pixel"] = lat / pix
    out["fk_latent_over_pixel"] = out["fk"]["latent"]["seconds"] / out["fk"]["pixel"]["seconds"]
    print(f"latent/pixel time: ReNO iteration {out['reno_latent_over_pixel']:.2f}x, FK search "
          f"{out['fk_latent_over_pixel']:.2f}x", flush=True)
    bad = sum(r["grad_nonfinite"] for r in out["reno"].values())
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 1 if bad or not all(math.isfinite(r["seconds"]) for r in out["fk"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
