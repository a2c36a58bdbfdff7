"""Tables, derived ratios and the cost-growth plot from the benchmark results."""
from __future__ import annotations

import sys

from . import overwrite_refusal


def _fmt_s(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _table(header, rows):
    cols = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
            for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, cols)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in cols) + "|"] + [line(r) for r in rows])


def reward_ratios(reward_step):
    """pixel/latent time ratio for every (pixel model, latent model) pair at each resolution."""
    out = []
    lat = [r for r in reward_step if r["path"] == "latent"]
    pix = [r for r in reward_step if r["path"] == "pixel"]
    for p in pix:
        for l in lat:
            if l["resolution"] == p["resolution"]:
                out.append({"resolution": p["resolution"], "pixel_model": p["model"], "latent_model": l["model"],
                            "ratio": p["median_s"] / l["median_s"],
                            "cpu_ratio": p["median_cpu_s"] / l["median_cpu_s"] if l.get("median_cpu_s") else None,
                            "memory_ratio": p["peak_mb"] / max(l["peak_mb"], 1.0)})
    return out


def reno_summary(row, suffix="_s"):
    """Overheads (% of the bare UNet step) and the whole-iteration latent/pixel ratio.

    From wall-clock medians (``_s``); with ``suffix="_cpu_s"`` from process-CPU medians, and the
    keys of the answer end in ``_cpu``. Called with the default, it adds both when it can."""
    b, l, p = row.get("bare" + suffix), row.get("latent" + suffix), row.get("pixel" + suffix)
    tag = "" if suffix == "_s" else "_cpu"
    out = {}
    if b and l:
        out["latent_overhead_pct" + tag] = 100 * (l - b) / b
    if b and p:
        out["pixel_overhead_pct" + tag] = 100 * (p - b) / b
    if l and p:
        out["latent_over_pixel" + tag] = l / p
        out["saving_pct" + tag] = 100 * (1 - l / p)
    if suffix == "_s" and "bare_cpu_s" in row:
        out.update(reno_summary(row, "_cpu_s"))
    return out


def markdown(result) -> str:
    """All tables of one run as Markdown (printed by run.py, pasted into docs/benchmarks.md)."""
    parts = []
    rs = result.get("reward_step", [])
    if rs:
        rows = [[r["path"], r["model"], r["resolution"], _fmt_s(r["median_s"]), _fmt_s(r.get("median_cpu_s")),
                 len(r["times_s"]), f"{r['peak_mb']:.0f}"] for r in rs]
        parts.append("Reward step (forward + backward to the latent, batch 1)\n\n"
                     + _table(["path", "model", "px", "median s", "median CPU s", "n", "peak MiB"], rows))
        ratios = reward_ratios(rs)
        if ratios:
            rows = [[r["resolution"], f"decode + {r['pixel_model']}", r["latent_model"], f"{r['ratio']:.1f}x",
                     f"{r['cpu_ratio']:.1f}x" if r.get("cpu_ratio") else "-", f"{r['memory_ratio']:.1f}x"]
                    for r in ratios]
            parts.append("Pixel / latent reward step\n\n"
                         + _table(["px", "pixel path", "latent path", "time ratio", "CPU-time ratio",
                                   "peak-memory ratio"], rows))
    rn = result.get("reno_iteration", [])
    if rn:
        rows = []
        for r in rn:
            s = reno_summary(r)
            for suffix, tag, label in (("_s", "", "wall"), ("_cpu_s", "_cpu", "CPU")):
                if "bare" + suffix not in r:
                    continue
                pct = lambda k: f"{s[k + tag]:+.1f}%" if k + tag in s else "-"
                rows.append([r["unet"], r["resolution"], label, _fmt_s(r.get("bare" + suffix)),
                             f"{_fmt_s(r.get('latent' + suffix))} ({r.get('latent_model', '')})",
                             (f"{_fmt_s(r.get('pixel' + suffix))} (decode + {r.get('pixel_model', '')})"
                              if "pixel" + suffix in r else ("skipped: memory" if "pixel_skipped" in r else "-")),
                             pct("latent_overhead_pct"), pct("pixel_overhead_pct"),
                             f"{s['latent_over_pixel' + tag]:.3f}" if "latent_over_pixel" + tag in s else "-",
                             f"{s['saving_pct' + tag]:.1f}%" if "saving_pct" + tag in s else "-"])
        parts.append("One ReNO iteration (UNet fwd+bwd + reward + noise update), median seconds\n\n"
                     + _table(["UNet", "px", "time", "bare", "+ latent reward", "+ pixel reward",
                               "latent overhead", "pixel overhead", "latent/pixel", "saving"], rows))
    sc = result.get("search_scoring", [])
    if sc:
        rows = []
        for r in sc:
            for path, label in (("latent", r.get("latent_model") or "latent"),
                                ("pixel", f"decode + {r['pixel_model']}" if r.get("pixel_model") else "decode + pixel CLIP")):
                if path + "_s" not in r:
                    why = "skipped: memory" if r.get(path + "_skipped") else "-"
                    rows.append([r["particles"], r["resolution"], label, why, "-", "-", "-"])
                    continue
                cpu = r.get(path + "_cpu_s")
                rows.append([r["particles"], r["resolution"], label, _fmt_s(r[path + "_s"]), _fmt_s(cpu),
                             _fmt_s(cpu / r["particles"]) if cpu is not None else "-", f"{r[path + '_peak_mb']:.0f}"])
        parts.append("One search scoring point (every particle's x0 prediction scored once, forward only)\n\n"
                     + _table(["particles", "px", "verifier", "wall s", "CPU s", "CPU s / particle", "peak MiB"], rows))
    return "\n\n".join(parts)


def plot(reward_step, path, title="", metric="median_s"):
    """Reward-step time vs resolution, one line per path+model, log-scaled time axis.

    ``metric="median_cpu_s"`` plots process-CPU time: on a shared CPU machine, wall-clock time
    also holds the neighbours' load. The plot is optional: without matplotlib nothing is written,
    a note goes to stderr and None is returned, so a finished run still keeps its tables and JSON."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot skipped ({path} not written): matplotlib is not installed (pip install matplotlib)",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for r in reward_step:
        series.setdefault((r["path"], r["model"]), []).append((r["resolution"], r[metric]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (p, m), pts in sorted(series.items()):
        pts.sort()
        label = f"decode + {m}" if p == "pixel" else m
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if p == "pixel" else "s",
                linestyle="-" if p == "pixel" else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("image side (pixels); latent side = pixels / 8")
    ax.set_ylabel("reward step fwd+bwd, median " + ("CPU seconds" if "cpu" in metric else "seconds"))
    ax.set_xticks(sorted({r["resolution"] for r in reward_step}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """python -m benchmarks.report RESULT.json [PLOT.png]: tables (and plot) again from a saved run."""
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Print the Markdown tables of a saved benchmark run (the JSON "
                                                 "benchmarks.run writes) and, given PLOT, draw its cost-growth plot.")
    parser.add_argument("result", metavar="RESULT.json", help="a saved run, e.g. benchmarks/results/cpu.json")
    parser.add_argument("plot_path", metavar="PLOT.png", nargs="?",
                        help="also write the reward-step cost plot here (needs matplotlib)")
    parser.add_argument("--overwrite", action="store_true", help="replace PLOT.png if it exists")
    args = parser.parse_args(argv)
    refusal = overwrite_refusal(args.plot_path, args.overwrite)
    if refusal:
        parser.error(refusal)
    try:
        with open(args.result) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read {args.result}: {e}")
    if not isinstance(res, dict) or not isinstance(res.get("reward_step"), list):   # e.g. a reno_memory JSON
        parser.error(f"{args.result} is not a saved python -m benchmarks.run result (no 'reward_step' list)")
    print(markdown(res))
    if args.plot_path and not res["reward_step"]:   # an empty plot would pass for a result
        print(f"plot skipped ({args.plot_path} not written): {args.result} has no reward-step rows", file=sys.stderr)
    elif args.plot_path:
        m = res.get("machine", {})
        on_cpu = m.get("device") == "cpu"
        title = (f"{m.get('device')} {m.get('gpu') or m.get('cpu_model', '')}, {m.get('dtype')}, "
                 f"threads={m.get('torch_threads')}" + (", process CPU time" if on_cpu else ""))
        plot(res["reward_step"], args.plot_path, title, "median_cpu_s" if on_cpu else "median_s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
