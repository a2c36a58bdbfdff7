"""How fast, and with how little memory, hostile Latent-CLIP files are refused (issue 15's cases).

    python -m benchmarks.hostile_checkpoints [--config Latent-ViT-B-8-512] [--dir /tmp/x]

Writes one full-size file (random weights, fp16, the config in its metadata), then copies of it whose
header carries each hostile change (the tensor bytes are copied, not re-encoded), and loads every file
in a fresh subprocess with one thread and network access blocked. Prints a table: outcome, seconds
from the call to the result, peak RSS growth over the process after imports, and whether tensor data
was read (safetensors opened) or a model built.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "good file": None,
    "text_cfg.hf_model_name": lambda c: c["text_cfg"].update(hf_model_name="openai/clip-vit-base-patch32"),
    "timm_model_name + pretrained": lambda c: c["vision_cfg"].update(timm_model_name="vit_base_patch16_224",
                                                                     timm_model_pretrained=True),
    "attentional_pool, 2M queries": lambda c: c["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=2_000_000),
    "config not JSON": "not json",
    "logit_scale + clip.logit_scale": "collision",
}

CHILD = r"""
import json, socket, sys, time
import torch
torch.set_num_threads(1)
def refuse(*a, **k):
    raise AssertionError("network access attempted")
socket.socket.connect = lambda self, *a: refuse()
socket.create_connection = refuse
import latentclip
from latentclip import checkpoints
seen = {"read": False, "built": False}
real_open, real_model = checkpoints.safe_open, checkpoints.LatentCLIP
checkpoints.safe_open = lambda *a, **k: seen.update(read=True) or real_open(*a, **k)
checkpoints.LatentCLIP = lambda *a, **k: seen.update(built=True) or real_model(*a, **k)
def peak_mib():  # VmHWM starts afresh at exec (ru_maxrss may carry the parent's peak over)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
base = peak_mib()
start = time.perf_counter()
try:
    latentclip.load(sys.argv[1])
    outcome = "loaded"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
seconds = time.perf_counter() - start
grown = peak_mib() - base
print(json.dumps({"outcome": outcome, "seconds": seconds, "rss_mib": grown, **seen}))
"""


def _split(blob_path: Path):
    with open(blob_path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _write_variant(good: Path, out: Path, change) -> Path:
    header, data_start = _split(good)
    extra = b""
    meta = header["__metadata__"]
    if change == "not json":
        meta["config"] = meta["config"][:-7] + "{oops"
    elif change == "collision":
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header["clip.logit_scale"] = {"dtype": "F32", "shape": [], "data_offsets": [end, end + 4]}
        extra = struct.pack("<f", 4.6)
    else:
        cfg = json.loads(meta["config"])
        change(cfg)
        meta["config"] = json.dumps(cfg)
    raw = json.dumps(header).encode()
    with open(good, "rb") as src, open(out, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        src.seek(data_start)
        while chunk := src.read(64 * 2**20):
            dst.write(chunk)
        dst.write(extra)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile_checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="Latent-ViT-B-8-512")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    from latentclip.configs import ConfigError, get_config
    try:   # before any folder is made
        get_config(args.config)
    except ConfigError as e:
        parser.error(f"--config: {e}")
    if args.dir:
        folder = Path(args.dir)
        folder.mkdir(parents=True, exist_ok=True)
        _measure(folder, args.config)
    else:   # the full-size file is 100+ MiB: not left behind in the temporary folder
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            _measure(Path(tmp), args.config)


def _measure(folder: Path, config: str):
    import torch
    import latentclip
    good = folder / "good.safetensors"
    if not good.exists():
        torch.manual_seed(0)
        latentclip.save(latentclip.LatentCLIP(config), good, dtype="fp16")
    print(f"{config}, fp16, {good.stat().st_size / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    print(f"| case | outcome | seconds | peak RSS growth (MiB) | tensor data read | model built |")
    print("|---|---|---|---|---|---|")
    for name, change in CASES.items():
        path = good if change is None else _write_variant(good, folder / f"case-{len(name)}.safetensors", change)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env)
        row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"outcome": r.stderr[-200:]}
        outcome = row["outcome"] if len(row["outcome"]) < 150 else row["outcome"][:147] + "..."
        print(f"| {name} | {outcome} | {row.get('seconds', float('nan')):.3f} | {row.get('rss_mib', float('nan')):.0f} "
              f"| {row.get('read')} | {row.get('built')} |")
        if path != good:
            path.unlink()


if __name__ == "__main__":
    main()
