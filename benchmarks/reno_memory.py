"""Peak memory and time of one ReNO iteration with and without gradient checkpointing.

One iteration = noise -> one-step UNet (t=999) -> x0 -> stand-in loss + chi regulariser -> backward
-> clip -> SGD step (``benchmarks.cases.RenoStep``'s "bare" variant: the UNet's fwd+bwd dominates).
Checkpointing is ``latentclip.reno.checkpointed(checkpoint_layers(unet))``, what the ReNO nodes use.
Each case runs in a fresh subprocess; peak = peak RSS (CPU) or ``max_memory_allocated`` (CUDA) above
the state just before the step, weights excluded; "peak allocated" = the tensors one step allocates
(``latentclip.memory_probe.peak_bytes``: the same counter on CUDA, profiler memory events on the CPU);
"ReNO's request" = what the ReNO nodes ask model management for (``latentclip.memory_probe``: the
generator measured at reduced sizes, extrapolated, x SAFETY). ``--attention pytorch`` uses PyTorch's
attention kernels, ComfyUI's pick on CUDA (on the CPU it picks its sub-quadratic kernel).

    python -m benchmarks.reno_memory --device cpu --cases sd21:512,sdxl:256 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_case(kind: str, px: int, ckpt: bool, device: str, dtype: str, threads: int, repeats: int) -> dict:
    try:   # an out-of-memory kill takes this benchmark, not a neighbour's job
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    import torch
    from benchmarks import arch
    from benchmarks.cases import PeakMemory, RenoStep, measured
    from latentclip.memory_probe import peak_bytes, probe_backward_memory, request_bytes
    from latentclip.reno import checkpoint_layers, checkpointed
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    unet, source = arch.unet(kind, device, dt)
    step = RenoStep(unet, kind, px // 8, None, device, dt)
    layers = checkpoint_layers(unet.unet) if ckpt else []
    mem = PeakMemory(device)
    times, cpu_times, peaks = [], [], []
    with checkpointed(layers):
        for i in range(1 + repeats):   # the first is a warm-up
            loss, t, c, peak, total = measured(step, mem, device)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss}")
            peaks.append(peak)
            if i:
                times.append(t)
                cpu_times.append(c)
        # what the ReNO nodes ask model management for: the generator measured at reduced sizes and
        # extrapolated (latentclip.memory_probe; the bare step's loss and reward are negligible)
        request = request_bytes(probe_backward_memory(step.generator, tuple(step.z.shape), device, step.z.dtype)["bytes"], 0)
        # held against the peak of the tensors a step allocates (what model management plans for; on
        # the CPU the RSS above also holds oneDNN's caches and the allocator's slack)
        allocated = peak_bytes(step, device)
    return {"unet": kind, "px": px, "checkpointing": ckpt, "request_mb": request / 2**20,
            "allocated_mb": allocated / 2**20, "device": device, "dtype": dtype, "threads": threads,
            "layers_checkpointed": len(layers), "seconds": statistics.median(times), "times": times,
            "cpu_seconds": statistics.median(cpu_times),
            "peak_mb": max(peaks), "peak_total_mb": total, "source": source}


def table(rows) -> str:
    out = ["| UNet | px | dtype | checkpointing | s / iteration (wall) | CPU s | peak above weights (MiB) | "
           "peak allocated (MiB) | ReNO's request (MiB) | vs. off: memory | vs. off: time |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["unet"], r["px"]): r for r in rows if not r["checkpointing"]}
    for r in rows:
        b = base.get((r["unet"], r["px"]))
        rel = ("-", "-") if b is None or b is r else (f"{r['peak_mb'] / b['peak_mb']:.2f}x", f"{r['seconds'] / b['seconds']:.2f}x")
        out.append(f"| {r['unet']} | {r['px']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | "
                   f"{r['seconds']:.2f} | {r.get('cpu_seconds', float('nan')):.2f} | {r['peak_mb']:.0f} | "
                   f"{r.get('allocated_mb', float('nan')):.0f} | {r.get('request_mb', float('nan')):.0f} | {rel[0]} | {rel[1]} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reno_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--cases", default="sd21:512", help="comma-separated unet:px (unet: sd21 or sdxl)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed iterations after one warm-up")
    ap.add_argument("--attention", choices=["comfyui", "pytorch"], default="comfyui",
                    help="comfyui: what ComfyUI picks on this device (sub-quadratic on the CPU); pytorch: "
                         "PyTorch's kernels, ComfyUI's pick on CUDA")
    ap.add_argument("--json", default=None)
    ap.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)   # internal: one case, in this process
    args = ap.parse_args(argv)
    for flag, n in (("--repeats", args.repeats), ("--threads", args.threads)):
        if n < 1:
            ap.error(f"{flag} {n}: expected at least 1")
    if not args.case:   # checked here: a bad case used to end as a traceback per subprocess, exit 0
        from benchmarks.arch import UNET_CONFIGS
        for case in args.cases.split(","):
            kind, _, px = case.partition(":")
            if kind not in UNET_CONFIGS or not px.isdigit() or int(px) < 8 or int(px) % 8:
                ap.error(f"--cases: {case!r} is not unet:px with unet one of {sorted(UNET_CONFIGS)} "
                         "and px a multiple of 8")
        from benchmarks import overwrite_refusal
        refusal = overwrite_refusal(args.json, args.overwrite)
        if refusal:
            ap.error(refusal)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.case:
        kind, px, ckpt = args.case.split(":")
        print("RESULT " + json.dumps(run_case(kind, int(px), ckpt == "1", args.device, dtype, args.threads, args.repeats)), flush=True)
        return 0
    rows, failed = [], 0
    for case in args.cases.split(","):
        for ckpt in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.reno_memory", "--case", f"{case}:{ckpt}", "--device", args.device,
                   "--dtype", dtype, "--threads", str(args.threads), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                                                                                LATENTCLIP_BENCH_ATTENTION=args.attention))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{case} checkpointing={ckpt}: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}", flush=True)
                failed += 1
                continue
            row = json.loads(lines[-1][7:])
            rows.append(row)
            print(f"{case} checkpointing={ckpt}: {row['seconds']:.2f} s, peak +{row['peak_mb']:.0f} MiB, "
                  f"allocated {row['allocated_mb']:.0f} MiB, request {row['request_mb']:.0f} MiB "
                  f"({row['layers_checkpointed']} layers checkpointed) [{row['source']}]", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0   # tests/gpu/run.sh reads a failed case from the exit status


if __name__ == "__main__":
    sys.exit(main())
