"""Entry point: ``python -m benchmarks.run [--device cpu|cuda] [--json OUT]``.

Measures what a Latent-CLIP reward saves against ReNO's pixel reward (VAE decode + pixel CLIP):
the reward step alone at several resolutions, and one whole ReNO iteration with a real-size UNet.
On CPU every case runs in a fresh subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import arch, overwrite_refusal, report
from .cases import run_case
from .search import summary_line as search_summary

LATENT_MODELS = ("Latent-ViT-B-8-512", "Latent-ViT-B-4-512-plus")
PIXEL_MODELS = ("ViT-B-32", "ViT-H-14")


def _positive(text):
    """argparse type: a whole number of at least 1 (0 used to fall back to the default silently)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _check_sides(p, flag, csv):
    """Image sides must be positive multiples of 8: the latent side is side // 8, and the decode makes side // 8 * 8."""
    for x in csv.split(","):
        if x.strip() and not (x.strip().isdigit() and int(x) >= 8 and int(x) % 8 == 0):
            p.error(f"{flag}: {x.strip()!r} is not an image side in pixels (a multiple of 8, at least 8)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--plot", help="cost-growth PNG (default: next to --json, or none)")
    p.add_argument("--overwrite", action="store_true", help="replace --json / --plot files that exist")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (default 1 on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--resolutions", default="256,512,768,1024", help="reward-step image sides, pixels")
    p.add_argument("--latent-models", default=",".join(LATENT_MODELS))
    p.add_argument("--pixel-models", default=",".join(PIXEL_MODELS))
    p.add_argument("--sweep-pixel-models", default="ViT-B-32",
                   help="pixel models run at every resolution; the others only at 512 and 1024")
    p.add_argument("--unet", default="auto", choices=["auto", "sdxl", "sd21"],
                   help="auto: SDXL on CUDA, SD-Turbo's SD2.1 UNet on CPU")
    p.add_argument("--reno-resolutions", default=None, help="default 256,512 on CPU, 512,1024 on CUDA")
    p.add_argument("--reno-latent-model", default="Latent-ViT-B-4-512-plus")
    p.add_argument("--reno-pixel-model", default=None,
                   help="ReNO's CLIP reward is ViT-H-14 (CUDA default); ViT-B-32 on CPU to fit 24 GB")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats per case (max; default 5 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=_positive, default=None, help="untimed runs first (default 1 CPU, 2 CUDA)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per case; big cases get fewer repeats (default 60 CPU, 20 CUDA)")
    p.add_argument("--reno-repeats", type=_positive, default=None, help="timed rounds of the ReNO case (default 3 CPU, 10 CUDA)")
    p.add_argument("--reno-budget", type=float, default=None,
                   help="seconds for the timed ReNO rounds (all three variants; default 600 CPU, 60 CUDA)")
    p.add_argument("--only", default="reward,reno", help="which parts: reward, reno, search")
    p.add_argument("--search-particles", type=_positive, default=8, help="search: particles scored at one scoring point")
    p.add_argument("--search-resolution", type=_positive, default=None, help="search: image side (default 512 CPU, 1024 CUDA)")
    p.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                   help="fresh subprocess per case (auto: yes on CPU, no on CUDA)")
    p.add_argument("--force", action="store_true", help="run CPU cases even when they look too big for the memory")
    args = p.parse_args(argv)
    unknown = set(_names(args.only)) - {"reward", "reno", "search"}
    if unknown or not _names(args.only):   # a typo used to run nothing and exit 0
        p.error(f"--only {args.only!r}: expected a comma-separated list of reward, reno, search")
    _check_sides(p, "--resolutions", args.resolutions)
    if args.reno_resolutions is not None:
        _check_sides(p, "--reno-resolutions", args.reno_resolutions)
    if args.search_resolution is not None:
        _check_sides(p, "--search-resolution", str(args.search_resolution))
    return args


def machine_info(args, threads):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": os.cpu_count(), "torch_threads": threads, "device": args.device,
            "dtype": args.dtype, "backend": arch.backend(args.device)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _names(csv):
    return [x.strip() for x in csv.split(",") if x.strip()]


def plan(args):
    """The list of case specs this invocation runs."""
    common = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
              "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget}
    specs = []
    parts = set(_names(args.only))
    res = [int(r) for r in _names(args.resolutions)]
    if "reward" in parts:
        sweep = set(args.sweep_pixel_models.split(","))
        for r in res:
            for m in _names(args.latent_models):
                specs.append({**common, "kind": "reward_step", "path": "latent", "model": m, "resolution": r})
            for m in _names(args.pixel_models):
                if m in sweep or r in (512, 1024) or len(res) == 1:
                    specs.append({**common, "kind": "reward_step", "path": "pixel", "model": m, "resolution": r})
    if "reno" in parts:
        for r in [int(x) for x in _names(args.reno_resolutions)]:
            specs.append({**common, "budget_s": args.reno_budget, "repeats": args.reno_repeats,
                          "kind": "reno_iteration", "unet": args.unet, "resolution": r,
                          "latent_model": args.reno_latent_model, "pixel_model": args.reno_pixel_model})
    if "search" in parts:
        specs.append({**common, "kind": "search_scoring", "particles": args.search_particles,
                      "resolution": args.search_resolution or (1024 if args.device == "cuda" else 512),
                      "latent_model": args.reno_latent_model, "pixel_model": args.reno_pixel_model})
    return specs


# Peak memory seen here in fp32 (MB per image pixel, batch 1), used only to skip CPU cases that
# cannot fit: decode + pixel CLIP 6.3 GB at 512 px; SD2.1 UNet fwd+bwd 4.3 GB at 512 px.
DECODE_MB_PER_PX = 0.025
FIT = 0.75   # run a CPU case only when its estimate is below this share of MemAvailable
UNET_MB_PER_PX = {"sd21": 0.017, "sdxl": 0.035}
WEIGHTS_MB = {"sd21": 3500, "sdxl": 10300, "ViT-H-14": 2600, "pixel": 600}


def estimate_mb(spec):
    """Rough fp32 CPU memory a case needs (weights + activations kept for backward)."""
    px = spec["resolution"] ** 2
    scale = torch.finfo(getattr(torch, spec["dtype"])).bits / 32
    need = 1000.0
    pixel_model = spec.get("model") if spec.get("path") == "pixel" else spec.get("pixel_model")
    if spec["kind"] == "reno_iteration":
        need += WEIGHTS_MB[spec["unet"]] * scale + UNET_MB_PER_PX[spec["unet"]] * px * scale
    if pixel_model:
        need += WEIGHTS_MB.get(pixel_model, WEIGHTS_MB["pixel"]) * scale + DECODE_MB_PER_PX * px * scale
    return need


def mem_available_mb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _oom_first():
    """If memory runs out anyway, let the kernel kill this benchmark case, not a neighbour's work."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def run_isolated(spec):
    """Run one case in a fresh interpreter; its last stdout line starting with RESULT is the answer."""
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cases", json.dumps(spec)], cwd=root, env=env,
                          capture_output=True, text=True, preexec_fn=_oom_first)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {**spec, "error": f"exit {proc.returncode}: " + " / ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def run_inprocess(spec):
    try:
        out = run_case(spec)
    except Exception as e:   # an out-of-memory case is a result to report, not a crash
        out = {**spec, "error": f"{type(e).__name__}: {e}"}
    if spec["device"] == "cuda":
        torch.cuda.empty_cache()
    return out


def collect(results):
    """Fold the raw case results into the JSON layout of the issue."""
    reward, reno, errors, search = [], [], [], []
    for r in results:
        if "error" in r:
            errors.append(r)
            continue
        if r["kind"] == "search_scoring":
            search.append(r)
        elif r["kind"] == "reward_step":
            reward.append({k: r[k] for k in ("path", "model", "resolution", "median_s", "median_cpu_s",
                                             "peak_mb", "peak_total_mb", "times_s", "source")})
        else:
            row = {"unet": arch.UNET_NAMES[r["unet"]], "unet_kind": r["unet"], "resolution": r["resolution"],
                   **{k: v for k, v in r.items() if k.startswith(("bare_", "latent_", "pixel_", "peak_total"))
                      and v is not None}}
            reno.append({**row, **report.reno_summary(row)})
    reno_rows = reno
    return {"reward_step": reward, "reward_ratios": report.reward_ratios(reward),
            "reno_iteration": reno_rows, "search_scoring": search, "errors": errors}


def main(argv=None):
    args = parse_args(argv)
    cpu = args.device == "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch sees no CUDA device")
    args.threads = args.threads or (1 if cpu else None)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.repeats = args.repeats or (5 if cpu else 10)
    args.warmup = args.warmup or (1 if cpu else 2)
    args.budget = args.budget if args.budget is not None else (60.0 if cpu else 20.0)
    args.reno_repeats = args.reno_repeats or (3 if cpu else 10)
    args.reno_budget = args.reno_budget if args.reno_budget is not None else (600.0 if cpu else 60.0)
    if args.unet == "auto":
        args.unet = "sd21" if cpu else "sdxl"
    args.reno_resolutions = args.reno_resolutions or ("256,512" if cpu else "512,1024")
    args.reno_pixel_model = args.reno_pixel_model or ("ViT-B-32" if cpu else "ViT-H-14")
    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    writes = (args.json, plot_path if "reward" in _names(args.only) else None)   # only reward steps are plotted
    for path in writes:   # checked now, not after an hour of benchmarking
        refusal = overwrite_refusal(path, args.overwrite)
        if refusal:
            raise SystemExit(refusal)
    if args.threads:
        torch.set_num_threads(args.threads)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cpu)
    info = machine_info(args, torch.get_num_threads())
    print(f"machine: {info.get('cpu_model', '?')}, {info['cpu_cores']} cores, torch {info['torch']} "
          f"threads={info['torch_threads']}, device={args.device} {info.get('gpu', '')}, dtype={args.dtype}, "
          f"VAE/UNet classes from {info['backend']}, isolate={isolate}", flush=True)
    results = []
    t_start = time.time()
    for spec in plan(args):
        need, avail = estimate_mb(spec), mem_available_mb()
        note = None
        if cpu and not args.force and need > FIT * avail and spec.get("pixel_model"):
            # a ReNO case whose pixel variant does not fit still measures bare vs latent
            note = (f"pixel variant skipped: needs about {need / 1024:.1f} GB, "
                    f"{avail / 1024:.1f} GB available (--force runs it anyway)")
            spec = {**spec, "pixel_model": None, "pixel_skipped": note}
            need = estimate_mb(spec)
        if cpu and not args.force and need > FIT * avail:
            out = {**spec, "error": f"skipped: needs about {need / 1024:.1f} GB, "
                                    f"{avail / 1024:.1f} GB available (--force runs it anyway)"}
        else:
            out = run_isolated(spec) if isolate else run_inprocess(spec)
        if note:
            print(f"  {spec['kind']} {spec['resolution']}: {note}", flush=True)
        results.append(out)
        what = spec["kind"] + " " + " ".join(str(spec.get(k)) for k in ("path", "unet", "model", "latent_model",
                                                                          "pixel_model", "resolution") if spec.get(k))
        if "error" in out:
            print(f"  {what}: FAILED {out['error']}", flush=True)
        elif spec["kind"] == "search_scoring":
            print(f"  {what} x{spec['particles']} particles: {search_summary(out)}", flush=True)
        elif spec["kind"] == "reward_step":
            print(f"  {what}: median {out['median_s']:.3f}s (CPU {out['median_cpu_s']:.3f}s) over "
                  f"{len(out['times_s'])}, peak +{out['peak_mb']:.0f} MiB  [{out['source']}]", flush=True)
        else:
            for k in ("bare", "latent", "pixel"):
                if f"{k}_s" in out:
                    print(f"  {what} [{k}]: median {out[f'{k}_s']:.3f}s (CPU {out[f'{k}_cpu_s']:.3f}s) over "
                          f"{len(out[f'{k}_times_s'])}, peak +{out[f'{k}_peak_mb']:.0f} MiB  [{out[f'{k}_source']}]",
                          flush=True)
    result = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": info, "settings": {k: getattr(args, k) for k in ("warmup", "repeats", "budget", "unet", "reno_repeats",
                                                      "reno_budget", "reno_latent_model", "reno_pixel_model")},
              "total_s": time.time() - t_start, **collect(results)}
    print()
    print(report.markdown(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nJSON: {args.json}")
    if plot_path and result["reward_step"]:
        title = (f"{args.device} {info.get('gpu') or info.get('cpu_model', '')}, {args.dtype}, "
                 f"threads={info['torch_threads']}" + (", process CPU time" if cpu else ""))
        if report.plot(result["reward_step"], plot_path, title, "median_cpu_s" if cpu else "median_s"):
            print(f"plot: {plot_path}")
    return result


if __name__ == "__main__":
    main()
