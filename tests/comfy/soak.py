"""Soak: many prompts through a real ComfyUI server; all must succeed, RSS and caches stay bounded.

A mix of scoring, zero-shot, best-of-N selection, the safety filter and short ReNO runs on the
tiny SDXL of the test-only fixture pack, with prompts that differ (texts, seeds, latents, three
Latent-CLIP files in turn) so ComfyUI's output cache never answers for the pack. Prompts are
queued in batches of ``batch``. After every batch ``GET /latentclip_test/stats?trim=1`` (fixture pack)
collects garbage, hands free heap pages back to the OS (glibc ``malloc_trim``) and counts live
tensors, Python objects and the pack's cached Latent-CLIPs; the server's RSS (VmRSS of its process)
is read just before (raw) and just after (trimmed) it, after the first ``warmup`` prompts and after
the last. At the end ComfyUI's history is cleared and the objects counted again.

As a test: ``run_soak(server, prompts=40)`` (tests/comfy/test_reliability.py). The full run:

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy/soak.py --prompts 200

prints one JSON object (prompts, seconds, RSS after the warm-up and at the end, growth, cache sizes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE_PACK = HERE / "fixture_pack"
SOAK_CKPTS = ("soak-a.safetensors", "soak-b.safetensors", "soak-c.safetensors")
LATENT_FILES = 4


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def prepare(srv) -> None:
    """Three tiny Latent-CLIP files and a few latent files (call before or after the server starts)."""
    import torch
    for seed, name in enumerate(SOAK_CKPTS):
        srv.add_tiny_latent_clip(name, seed=10 + seed)
    g = torch.Generator().manual_seed(0)
    for i in range(LATENT_FILES):
        write_latent(srv, f"soak-{i}.latent", torch.randn(3, 4, 64, 64, generator=g))


def write_latent(srv, name, x) -> str:
    """A .latent file in the server's input folder, read by the core LoadLatent node unscaled."""
    import safetensors.torch
    import torch
    safetensors.torch.save_file({"latent_tensor": x.contiguous(), "latent_format_version_0": torch.tensor([])},
                                str(srv.input_dir / name))
    return name


KINDS = ("score", "zero-shot", "select", "filter", "reno")


def soak_prompt(i: int, kinds=KINDS) -> dict:
    """The i-th prompt of the mix (deterministic in i); ``kinds`` restricts the mix (for diagnosis)."""
    ckpt = SOAK_CKPTS[(i // 5) % len(SOAK_CKPTS)]   # all three files and all five kinds within the warm-up
    graph = {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": ckpt, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": f"soak-{i % LATENT_FILES}.latent"}},
    }
    kind = KINDS.index(kinds[i % len(kinds)])
    text = f"a photo of thing number {i}"
    if kind == 0:
        graph["3"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": text}}
        graph["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    elif kind == 1:
        graph["3"] = {"class_type": "LatentCLIPZeroShot", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                    "labels": f"cat\ndog\nitem {i}", "template": "a photo of {}"}}
        graph["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    elif kind == 2:
        graph["3"] = {"class_type": "LatentCLIPSelectBest", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                      "text": text, "k": 1 + i % 3}}
        graph["4"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["3", 0], "text": "a dog"}}
        graph["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    elif kind == 3:
        graph["3"] = {"class_type": "LatentCLIPSafetyFilter", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                        "concepts": f"blood\nthing {i}", "threshold": 0.5,
                                                                        "action": "replace with zeros"}}
        graph["4"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["3", 0], "text": text}}
        graph["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    else:
        graph.update(reno_graph(ckpt, iterations=2, seed=i, text=text))
        graph["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["13", 2]}}
    return graph


def reno_graph(ckpt: str, iterations: int, seed: int = 0, text: str = "a red fox", batch: int = 1,
               lr: float = 5.0, unet_seed: int = 0) -> dict:
    """Nodes 10-13: tiny SDXL (fixture pack), an empty latent, a Latent-CLIP reward and the ReNO node."""
    return {
        "10": {"class_type": "LatentCLIPTestTinySDXL", "inputs": {"seed": unet_seed}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": batch}},
        "12": {"class_type": "LatentCLIPReward", "inputs": {"latent_clip": ["1", 0], "text": text, "mode": "match",
                                                             "weight": 0.01}},
        "13": {"class_type": "LatentCLIPReNO", "inputs": {
            "model": ["10", 0], "positive": ["10", 1], "negative": ["10", 2], "latent_image": ["11", 0],
            "reward": ["12", 0], "seed": seed, "iterations": iterations, "learning_rate": lr, "optimizer": "sgd",
            "grad_clip": 0.1, "regularization": 0.01, "steps": 1, "cfg": 1.0}},
    }


def stats(srv, trim: bool = False) -> dict:
    return srv.get("/latentclip_test/stats" + ("?trim=1" if trim else ""), timeout=60)


def run_soak(srv, prompts: int = 200, warmup: int = 20, batch: int = 20, timeout_per_prompt: float = 30.0,
             log=None, kinds=KINDS) -> dict:
    """Queue ``prompts`` prompts in batches; every one must succeed. Returns the numbers."""
    if not (prompts > warmup > 0 and batch > 0):
        raise ValueError(f"need prompts > warmup > 0 and batch > 0, got {prompts}, {warmup}, {batch}")
    failures, max_cached, rss_warm = [], 0, None
    started = time.monotonic()
    rss_start = rss_kb(srv.proc.pid)
    done = 0
    while done < prompts:
        n = min(batch, prompts - done)
        ids = []
        for i in range(done, done + n):
            status, body = srv.submit(soak_prompt(i, kinds))
            if status != 200:
                raise AssertionError(f"soak prompt {i} refused: HTTP {status} {body!r:.400}")
            ids.append((i, body["prompt_id"]))
        for i, pid in ids:   # in queue order, each bounded
            entry = srv.wait_history(pid, timeout=timeout_per_prompt * n)
            if entry["status"]["status_str"] != "success":
                failures.append((i, entry["status"]))
        done += n
        raw = rss_kb(srv.proc.pid)
        now = stats(srv, trim=True)
        max_cached = max(max_cached, now["cached_models"])
        if rss_warm is None and done >= warmup:   # the first batch boundary at or after the warm-up
            rss_warm, raw_warm, warm = rss_kb(srv.proc.pid), raw, now
        if log:
            log(f"soak: {done}/{prompts} prompts, {time.monotonic() - started:.1f} s, RSS {rss_kb(srv.proc.pid) / 1024:.1f} MiB, "
                f"{now['gc_objects']} Python objects, {now['tensors']} tensors, {now['allocated_blocks']} blocks")
    seconds = time.monotonic() - started
    raw_last, final = raw, now
    rss_last = rss_kb(srv.proc.pid)
    srv.request("POST", "/history", {"clear": True})   # ComfyUI's own per-prompt record, kept by design
    cleared = stats(srv)
    mib = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"prompts": prompts, "failed": len(failures), "failures": failures[:3], "seconds": round(seconds, 1),
            "seconds_per_prompt": round(seconds / prompts, 3), "rss_start_mib": mib(rss_start),
            "rss_after_warmup_mib": mib(rss_warm), "rss_last_mib": mib(rss_last), "rss_growth": round(rss_last / rss_warm - 1, 4),
            "raw_rss_after_warmup_mib": mib(raw_warm), "raw_rss_last_mib": mib(raw_last),
            "raw_rss_growth": round(raw_last / raw_warm - 1, 4), "max_cached_models": max_cached,
            "tensors_after_warmup": warm["tensors"], "tensors_last": final["tensors"],
            "python_objects_after_warmup": warm["gc_objects"], "python_objects_last": final["gc_objects"],
            "python_objects_after_history_clear": cleared["gc_objects"],
            "grad_tensors_after": final["grad_tensors"], "unet_extra_functions_after": final["unet_extra_functions"]}


def start_server(comfy_root):
    """A fresh server with the pack, the fixture pack and the soak files."""
    sys.path.insert(0, str(HERE))
    import comfy_server
    srv = comfy_server.ComfyServer(comfy_root, extra_packs=[FIXTURE_PACK])
    srv.add_tiny_latent_clip()
    prepare(srv)
    return srv.start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args(argv)
    import os
    root = args.comfyui or os.environ.get("COMFYUI_PATH")
    if not root:
        parser.error("set COMFYUI_PATH or pass --comfyui")
    srv = start_server(root)
    try:
        result = run_soak(srv, args.prompts, args.warmup, log=lambda m: print(m, file=sys.stderr, flush=True),
                          kinds=tuple(args.kinds.split(",")))
    finally:
        srv.stop()
    ok = (result["failed"] == 0 and result["rss_growth"] < 0.05 and result["max_cached_models"] <= 2
          and result["tensors_last"] == result["tensors_after_warmup"])
    if ok:
        import shutil
        shutil.rmtree(srv.workdir, ignore_errors=True)
    else:
        result["server_log"] = str(srv.log_path)   # kept for a look
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
