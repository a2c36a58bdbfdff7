"""Smoke run of the benchmark code paths at toy sizes (the real runs are `python -m benchmarks.run`)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import arch, cases, report, run

ROOT = Path(__file__).resolve().parents[2]


def test_init_random_fills_layers_whose_init_was_skipped():
    class NoInitLinear(nn.Linear):       # what comfy.ops.disable_weight_init does
        def reset_parameters(self):
            return None

    m = nn.Sequential(NoInitLinear(64, 32), nn.LayerNorm(32))
    with torch.no_grad():
        m[0].weight.fill_(float("nan"))
        m[1].weight.fill_(7.0)
    arch.init_random_(m)
    w = m[0].weight
    assert torch.isfinite(w).all()
    assert w.abs().max() <= 1 / math.sqrt(64) + 1e-6 and w.std() > 0   # nn.Linear's default bound
    assert torch.equal(m[1].weight, torch.ones(32))


PEAK_MEMORY_PROBE = """
import numpy as np
from benchmarks import cases
keep = np.ones(20_000_000)           # 160 MB held before the measurement starts
mem = cases.PeakMemory("cpu")
mem.start()
tmp = np.ones(32_000_000)            # 256 MB inside it
tmp[::512] = 2.0
del tmp
peak, total = mem.stop()
print(peak, total)
"""


def test_peak_memory_sees_an_allocation_and_not_the_baseline():
    # In a fresh process, as the benchmarks run CPU cases: peak RSS cannot see an allocation that
    # reuses pages a long-lived process (this test session) freed earlier but still holds.
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak, total = map(float, out.stdout.split())
    assert 200 < peak < 700, peak
    assert total >= peak


def test_latent_reward_step_gives_a_finite_gradient_and_timings():
    spec = {"kind": "reward_step", "path": "latent", "model": "Latent-ViT-Tiny-test", "resolution": 1024,
            "device": "cpu", "dtype": "float32", "threads": 1, "warmup": 1, "repeats": 3, "budget_s": None}
    out = cases.run_case(spec)
    assert len(out["times_s"]) == 3 and all(t > 0 for t in out["times_s"])
    assert out["median_s"] == sorted(out["times_s"])[1]
    assert out["peak_mb"] >= 0 and "LatentCLIP('Latent-ViT-Tiny-test')" in out["source"]


def test_budget_cuts_repeats_of_slow_cases():
    assert cases.n_repeats({"repeats": 5, "budget_s": 60}, 0.5) == 5
    assert cases.n_repeats({"repeats": 5, "budget_s": 60}, 25.0) == 2
    assert cases.n_repeats({"repeats": 5, "budget_s": 60}, 300.0) == 1
    assert cases.n_repeats({"repeats": 5, "budget_s": None}, 300.0) == 5


def test_entry_point_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = run.main(["--only", "reward", "--latent-models", "Latent-ViT-Tiny-test", "--pixel-models", "",
                       "--resolutions", "512", "--repeats", "2", "--isolate", "no",
                       "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["resolution"] for r in data["reward_step"]] == [512]
    for r in data["reward_step"]:
        assert {"path", "model", "resolution", "median_s", "peak_mb"} <= set(r)
        assert r["path"] == "latent" and r["median_s"] > 0
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["cpu_cores"] >= 1
    assert data["errors"] == [] and result["reward_step"] == data["reward_step"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "threads=1" in printed and "| latent | Latent-ViT-Tiny-test | 512 |" in printed


def test_reno_summary_and_ratios_follow_the_timings():
    s = report.reno_summary({"bare_s": 10.0, "latent_s": 10.2, "pixel_s": 14.0})
    assert s["latent_overhead_pct"] == pytest.approx(2.0)
    assert s["pixel_overhead_pct"] == pytest.approx(40.0)
    assert s["saving_pct"] == pytest.approx(100 * (1 - 10.2 / 14.0))
    steps = [{"path": "latent", "model": "L", "resolution": 512, "median_s": 0.5, "median_cpu_s": 0.4, "peak_mb": 10},
             {"path": "pixel", "model": "P", "resolution": 512, "median_s": 20.0, "median_cpu_s": 8.0, "peak_mb": 900},
             {"path": "pixel", "model": "P", "resolution": 1024, "median_s": 80.0, "median_cpu_s": 30.0, "peak_mb": 3000}]
    (r,) = report.reward_ratios(steps)
    assert r["ratio"] == pytest.approx(40.0) and r["cpu_ratio"] == pytest.approx(20.0) and r["memory_ratio"] == 90


def test_reno_step_moves_the_noise_through_unet_and_latent_reward():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)          # stands in for the UNet: same call, toy size
    unet = lambda x, t, context, y: conv(x) + 0 * context.mean()
    reward = cases.LatentReward("Latent-ViT-Tiny-test", "cpu", torch.float32)
    step = cases.RenoStep(unet, "sd21", 16, reward, "cpu", torch.float32)
    z0 = step.z.detach().clone()
    losses = [step() for _ in range(3)]
    assert all(torch.isfinite(l) for l in losses)
    assert not torch.equal(step.z.detach(), z0) and torch.isfinite(step.z).all()
    assert step.z.grad is None or float(step.z.grad.abs().sum()) == 0.0   # zeroed after the update
    assert conv.weight.grad is not None   # the toy UNet is not frozen; the backward went through it


def test_a_failing_isolated_case_is_reported_not_raised():
    spec = {"kind": "reward_step", "path": "latent", "model": "Latent-ViT-Tiny-test", "resolution": 512,
            "device": "cpu", "dtype": "no_such_dtype", "threads": 1, "warmup": 1, "repeats": 1}
    out = run.run_isolated(spec)
    assert out["error"].startswith("exit 1") and "no_such_dtype" in out["error"]
    assert out["model"] == "Latent-ViT-Tiny-test"
