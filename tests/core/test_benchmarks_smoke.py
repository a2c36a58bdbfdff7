"""Smoke run of the benchmark code paths at toy sizes (the real runs are `python -m benchmarks.run`)."""
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import arch, cases, distill_cost, hostile_checkpoints, reno_memory, report, run

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


# -- bad input, existing outputs, exit status ----------------------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["--dtype", "float65"], "float65"),            # used to end in a traceback from torch.finfo
    (["--resolutions", "256,2x6"], "2x6"),          # used to end in a traceback from int()
    (["--resolutions", "500"], "500"),              # latent 62x62 decodes to 496 px, not the 500 the table names
    (["--only", "rewards"], "rewards"),             # used to run nothing and exit 0
    (["--repeats", "0"], "'0'"),                    # used to fall back to the default silently
])
def test_run_refuses_bad_arguments_in_one_line_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


TINY_RUN = ["--only", "reward", "--latent-models", "Latent-ViT-Tiny-test", "--pixel-models", "",
            "--resolutions", "512", "--repeats", "1", "--isolate", "no"]


def test_run_keeps_an_existing_json_and_plot_unless_told_to_overwrite(tmp_path, monkeypatch):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    png.write_text("someone's plot")
    ran = []
    monkeypatch.setattr(run, "run_inprocess", lambda spec: ran.append(spec) or cases.run_case(spec))
    with pytest.raises(SystemExit, match="bench.png exists; refusing to overwrite it"):
        run.main(TINY_RUN + ["--json", str(out)])     # the default plot path, next to --json
    assert png.read_text() == "someone's plot" and not out.exists() and ran == []   # refused before any case
    out.write_text("{}")
    run.main(TINY_RUN + ["--json", str(out), "--overwrite"])
    assert json.loads(out.read_text())["reward_step"] and png.read_bytes()[:4] == b"\x89PNG" and len(ran) == 1


def test_report_refuses_a_json_that_is_not_a_run_and_draws_no_empty_plot(tmp_path, capsys):
    memory = tmp_path / "reno_memory.json"
    memory.write_text(json.dumps([{"unet": "sd21", "px": 256}]))   # what benchmarks.reno_memory writes
    with pytest.raises(SystemExit) as e:
        report.main([str(memory)])
    assert e.value.code == 2 and "reno_memory.json is not a saved python -m benchmarks.run result" in capsys.readouterr().err
    reno_only = tmp_path / "reno.json"
    reno_only.write_text(json.dumps({"reward_step": [], "reno_iteration": []}))
    assert report.main([str(reno_only), str(tmp_path / "new.png")]) == 0
    assert not (tmp_path / "new.png").exists() and "no reward-step rows" in capsys.readouterr().err
    kept = tmp_path / "kept.png"
    kept.write_text("someone's plot")
    with pytest.raises(SystemExit):
        report.main([str(ROOT / "benchmarks/results/cpu.json"), str(kept)])
    assert kept.read_text() == "someone's plot"


def _no_subprocess(*a, **k):
    raise AssertionError("a case was started")


def test_reno_memory_refuses_bad_cases_and_an_existing_json_before_starting_any(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reno_memory.subprocess, "run", _no_subprocess)
    for argv, named in ((["--cases", "sd15:256"], "'sd15:256'"), (["--cases", "sd21"], "'sd21'"),
                        (["--repeats", "0"], "--repeats 0")):
        with pytest.raises(SystemExit) as e:
            reno_memory.main(argv)
        assert e.value.code == 2 and named in capsys.readouterr().err
    existing = tmp_path / "out.json"
    existing.write_text("[]")
    with pytest.raises(SystemExit):
        reno_memory.main(["--cases", "sd21:256", "--json", str(existing)])
    assert existing.read_text() == "[]"


def test_reno_memory_exits_nonzero_when_a_case_failed(monkeypatch):
    # tests/gpu/run.sh reports PASS or FAIL from this exit status
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="torch.OutOfMemoryError: CUDA out of memory")
    monkeypatch.setattr(reno_memory.subprocess, "run", lambda *a, **k: failed)
    assert reno_memory.main(["--cases", "sd21:256"]) == 1


def test_distill_cost_trains_on_the_cpu_where_a_gpu_is_there(tmp_path, monkeypatch):
    from latentclip.train import distributed
    real = distributed.pick_device

    def on_a_gpu_machine(world, device=None):   # what pick_device does there when no device is given
        assert device, "the trainer was left to pick this machine's GPU; the table reports CPU seconds"
        return real(world, device)

    monkeypatch.setattr(distributed, "pick_device", on_a_gpu_machine)
    row = distill_cost.train_cost("mini", 1, 0.0, tmp_path)
    assert row["cpu_s_per_sample"] > 0 and row["wall_s_per_sample"] > 0


def test_distill_cost_refuses_bad_arguments_and_an_existing_json(tmp_path, capsys):
    existing = tmp_path / "cost.json"
    existing.write_text("{}")
    for argv, named in ((["--configs", "mini,B8"], "'B8'"), (["--steps", "0"], "--steps 0"),
                        (["--configs", "mini", "--steps", "1", "--json", str(existing)], "cost.json exists")):
        with pytest.raises(SystemExit) as e:
            distill_cost.main(argv)
        assert e.value.code == 2 and named in capsys.readouterr().err
    assert existing.read_text() == "{}"


def test_hostile_checkpoints_leaves_no_temporary_files_and_names_a_bad_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    loaded = json.dumps({"outcome": "loaded", "seconds": 0.1, "rss_mib": 1.0, "read": True, "built": True})
    monkeypatch.setattr(hostile_checkpoints.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess([], 0, stdout=loaded + "\n", stderr=""))
    hostile_checkpoints.main(["--config", "Latent-ViT-Tiny-test"])
    assert "| good file | loaded |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []      # the model file and its variants went with the folder
    with pytest.raises(SystemExit) as e:
        hostile_checkpoints.main(["--config", "no-such-config"])
    assert e.value.code == 2 and "'no-such-config' is unknown" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _gpu_sh_copy(tmp_path, env_sh):
    """gpu.sh in a stand-in repository: tests/gpu/env.sh and python3 are stubs, so no GPU is needed."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "tests/gpu").mkdir(parents=True)
    (repo / "benchmarks/gpu.sh").write_text((ROOT / "benchmarks/gpu.sh").read_text())
    (repo / "tests/gpu/env.sh").write_text(env_sh)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text("#!/bin/sh\necho benchmark ran\n")
    (bin_ / "python3").chmod(0o755)
    return repo, {**os.environ, "PATH": f"{bin_}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}


def test_gpu_sh_keeps_an_earlier_runs_log(tmp_path):
    repo, env = _gpu_sh_copy(tmp_path, 'GPU_STAGE=$(mktemp -d "$OUT/stage.XXXXXX")\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out/benchmarks_cuda.log").write_text("an earlier run's log\n")
    r = subprocess.run(["bash", str(repo / "benchmarks/gpu.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "benchmarks_cuda.log exists" in r.stdout
    assert (tmp_path / "out/benchmarks_cuda.log").read_text() == "an earlier run's log\n"


def test_gpu_sh_removes_its_staging_folder_when_the_set_up_fails(tmp_path):
    repo, env = _gpu_sh_copy(tmp_path, 'GPU_STAGE=$(mktemp -d "$OUT/stage.XXXXXX")\necho "no usable .gpu/"\nreturn 1\n')
    r = subprocess.run(["bash", str(repo / "benchmarks/gpu.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no usable .gpu/" in r.stdout
    assert list((tmp_path / "out").glob("stage.*")) == []


def test_the_report_prints_a_saved_search_run():
    """A saved --only search run used to print nothing: report.markdown had no table for search_scoring."""
    from benchmarks import report
    saved = json.loads((ROOT / "benchmarks/results/cpu_search.json").read_text())
    text = report.markdown(saved)
    assert "One search scoring point" in text and "Latent-ViT-B-4-512-plus" in text and "decode + ViT-B-32" in text
    skipped = json.loads((ROOT / "benchmarks/results/cpu_search_1024.json").read_text())
    assert "skipped: memory" in report.markdown(skipped)


def test_encode_throughput_refuses_a_malformed_case_naming_the_expected_form(capsys):
    from benchmarks import encode_throughput
    with pytest.raises(SystemExit):
        encode_throughput.main(["--cases", "flux:ViT-B-32"])
    err = capsys.readouterr().err
    assert "'flux:ViT-B-32' is not VAE_ARCHITECTURE:TEACHER:IMAGES[:WORKERS]" in err and "flux" in err
    with pytest.raises(SystemExit):
        encode_throughput.main(["--cases", "hunyuan:ViT-B-32:8"])
    assert "'hunyuan:ViT-B-32:8'" in capsys.readouterr().err
