"""Review of the distillation trainer: precision on GPUs without bf16, and log.jsonl after a crash.

Each test failed before its fix: training ran under bf16 autocast on every CUDA GPU (emulated and slow,
or wrong, on V100/T4/GTX cards) with no way to choose; and a run that crashed after logging steps past
its last checkpoint logged those steps twice once resumed.

The fp16 path (autocast + GradScaler) runs here on the CPU with ``--precision fp16``: the same code a
GPU without bf16 gets from ``--precision auto``.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import tiny_teacher, write_dataset  # noqa: E402
from test_distill_train import _settings  # noqa: E402

import latentclip  # noqa: E402
import latentclip.train.distill as distill  # noqa: E402
from latentclip.errors import InputError  # noqa: E402
from latentclip.train.__main__ import main  # noqa: E402
from latentclip.train.distill import LOG_FILE, RESUME_FILE, resolve_precision, run  # noqa: E402

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def _state(work) -> dict:
    return torch.load(Path(work) / RESUME_FILE, map_location="cpu", weights_only=True)


def _log(work) -> list[dict]:
    return [json.loads(line) for line in (Path(work) / LOG_FILE).read_text().splitlines()]


class _InfGradient(torch.autograd.Function):
    """The loss unchanged, its gradient infinite: an fp16 overflow in the backward pass, on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _overflow_at(monkeypatch, calls_that_overflow):
    real, calls = distill.cosine_regression, []

    def loss(student, teacher):
        calls.append(1)
        out = real(student, teacher)
        return _InfGradient.apply(out) if len(calls) in calls_that_overflow else out
    monkeypatch.setattr(distill, "cosine_regression", loss)


# --- precision ---------------------------------------------------------------------------------

def test_auto_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_the_cpu():
    assert resolve_precision("auto", GPU, bf16_supported=lambda d: True) == "bf16"     # the old default
    assert resolve_precision("auto", GPU, bf16_supported=lambda d: False) == "fp16"    # V100, T4, GTX 10xx/20xx
    assert resolve_precision("auto", CPU) == "fp32"
    for asked in ("fp16", "fp32"):
        assert resolve_precision(asked, GPU, bf16_supported=lambda d: False) == asked
    assert resolve_precision("fp16", CPU) == "fp16"


def test_bf16_on_a_gpu_without_it_is_one_clear_error():
    with pytest.raises(InputError, match=r"^--precision bf16: .*cuda:0.* has no native bf16.*expected --precision "
                                         r"auto \(fp16 here\), fp16 or fp32"):
        resolve_precision("bf16", GPU, bf16_supported=lambda d: False)
    with pytest.raises(InputError, match=r"^--precision fp8: expected auto, bf16, fp16 or fp32"):
        resolve_precision("fp8", CPU)


def test_bf16_on_a_gpu_without_it_stops_the_run_before_any_work(tmp_path, monkeypatch):
    """Checked first: the capability query is all that touches the GPU (none is here)."""
    monkeypatch.setattr(distill, "cuda_bf16_supported", lambda device: False)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", device="cuda", precision="bf16")
    with pytest.raises(InputError, match=r"^--precision bf16: .*has no native bf16"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert not (Path(s.work) / RESUME_FILE).exists()


def test_the_command_line_takes_precision_and_saved_commands_keep_auto(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("latentclip.train.__main__.run", lambda s: seen.append(s.precision))
    base = ["distill", "--data", "d", "--teacher", "t", "--out", "o.safetensors", "--work", "w"]
    assert main(base) == 0 and main(base + ["--precision", "fp16"]) == 0
    assert seen == ["auto", "fp16"]
    with pytest.raises(SystemExit):
        main(base + ["--precision", "half"])
    assert "--precision: invalid choice: 'half'" in capsys.readouterr().err


def test_fp16_keeps_the_scaler_in_the_checkpoint_and_resumes_as_an_uninterrupted_run(tmp_path):
    data = write_dataset(tmp_path / "data", n=16)
    whole = _settings(tmp_path, data, "whole", steps=4, precision="fp16", log_every=1)
    assert run(whole, teacher=tiny_teacher(), log=lambda m: None) == Path(whole.out)
    parts = _settings(tmp_path, data, "parts", steps=4, precision="fp16", log_every=1, stop_after=2)
    assert run(parts, teacher=tiny_teacher(), log=lambda m: None) is None
    assert _state(parts.work)["scaler"]["scale"] == 65536.0 and _state(parts.work)["precision"] == "fp16"
    parts.stop_after = None
    said = []
    assert run(parts, teacher=tiny_teacher(), log=said.append) == Path(parts.out)
    assert "fp16" in said[0]
    a, b = _state(whole.work), _state(parts.work)
    assert a["scaler"] == b["scaler"] and a["step"] == b["step"] == 4
    for key in a["visual"]:
        assert torch.equal(a["visual"][key], b["visual"][key]), key
    assert [r["cosine"] for r in _log(whole.work)] == [r["cosine"] for r in _log(parts.work)]
    assert {(r["precision"], r["loss_scale"]) for r in _log(parts.work)} == {("fp16", 65536.0)}
    meta = latentclip.checkpoints.read_safetensors_header(Path(parts.out))["__metadata__"]
    assert json.loads(meta["distill"])["precision"] == "fp16"


def test_fp32_records_its_precision_and_writes_no_scaler(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=1, log_every=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert _state(s.work)["precision"] == "fp32" and "scaler" not in _state(s.work)
    assert _log(s.work)[0]["precision"] == "fp32" and "loss_scale" not in _log(s.work)[0]
    meta = latentclip.checkpoints.read_safetensors_header(Path(s.out))["__metadata__"]
    assert json.loads(meta["distill"])["precision"] == "fp32"


def test_an_fp16_overflow_step_is_skipped_and_the_scale_lowered_not_the_run_stopped(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", n=16)
    one = _settings(tmp_path, data, "one", steps=2, precision="fp16", stop_after=1)
    run(one, teacher=tiny_teacher(), log=lambda m: None)
    _overflow_at(monkeypatch, {2})
    s = _settings(tmp_path, data, "skip", steps=2, precision="fp16", log_every=1)
    said = []
    assert run(s, teacher=tiny_teacher(), log=said.append) == Path(s.out)
    skipped, good = _state(s.work), _state(one.work)
    for key in good["visual"]:   # step 2 changed nothing
        assert torch.equal(skipped["visual"][key], good["visual"][key]), key
    assert good["scaler"]["scale"] == 65536.0 and skipped["scaler"]["scale"] == 32768.0
    assert [(r["step"], r["skipped_steps"], r["loss_scale"]) for r in _log(s.work)] == [(1, 0, 65536.0), (2, 1, 32768.0)]


def test_the_same_overflow_in_fp32_still_stops_the_run(tmp_path, monkeypatch):
    _overflow_at(monkeypatch, {2})
    data = write_dataset(tmp_path / "data", n=16)
    s = _settings(tmp_path, data, "run", steps=3, save_every=1)
    with pytest.raises(InputError, match=r"^step 2: the gradients are not finite"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert _state(s.work)["step"] == 1


def test_fp16_stops_when_the_loss_is_not_finite(tmp_path, monkeypatch):
    real, calls = distill.cosine_regression, []

    def nan_at_2(student, teacher):
        calls.append(1)
        return real(student, teacher) * (float("nan") if len(calls) == 2 else 1.0)
    monkeypatch.setattr(distill, "cosine_regression", nan_at_2)
    data = write_dataset(tmp_path / "data", n=16)
    s = _settings(tmp_path, data, "run", steps=3, save_every=1, precision="fp16")
    with pytest.raises(InputError, match=r"^step 2: the loss is not finite \(cosine loss nan.*\) in fp16.*nothing was "
                                         r"saved.*--precision fp32"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert _state(s.work)["step"] == 1


def test_fp16_stops_when_the_loss_scale_collapses(tmp_path, monkeypatch):
    """Every step overflowing halves the scale: past the floor the run has diverged, said once."""
    monkeypatch.setattr(distill, "MIN_LOSS_SCALE", 10000.0)   # 65536 -> 32768 -> 16384 -> 8192: below at step 3
    _overflow_at(monkeypatch, set(range(1, 100)))
    data = write_dataset(tmp_path / "data", n=16)
    s = _settings(tmp_path, data, "run", steps=6, save_every=1, precision="fp16")
    with pytest.raises(InputError, match=r"^step 3: the fp16 loss scale fell to 8192, below 10000 \(3 steps in a row skipped"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert _state(s.work)["step"] == 2   # the skipped steps 1-2 were saved (weights unchanged), step 3 not


def test_resuming_with_another_precision_is_said(tmp_path, monkeypatch):
    """auto can resolve differently on another GPU type: the run resumes and says so."""
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=2, stop_after=1, precision="fp16")
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    s.precision, said = "fp32", []
    run(s, teacher=tiny_teacher(), log=said.append)
    assert any("trained in fp16 until step 1 and continues in fp32" in m for m in said), said
    assert "scaler" not in _state(s.work)


# --- log.jsonl after a crash -------------------------------------------------------------------

def _crash_at(monkeypatch, call):
    real, calls = distill.cosine_regression, []

    def loss(student, teacher):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("the node went away")
        return real(student, teacher)
    monkeypatch.setattr(distill, "cosine_regression", loss)
    return lambda: monkeypatch.setattr(distill, "cosine_regression", real)


def test_a_resume_drops_the_log_lines_it_repeats_and_keeps_every_earlier_one(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", n=16)
    whole = _settings(tmp_path, data, "whole", steps=6, save_every=3, log_every=1)
    run(whole, teacher=tiny_teacher(), log=lambda m: None)
    s = _settings(tmp_path, data, "run", steps=6, save_every=3, log_every=1)
    undo = _crash_at(monkeypatch, 5)   # logged steps 1-4, last checkpoint at step 3
    with pytest.raises(RuntimeError, match="went away"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    undo()
    log = Path(s.work) / LOG_FILE
    before = log.read_bytes().splitlines(keepends=True)
    assert [r["step"] for r in _log(s.work)] == [1, 2, 3, 4] and _state(s.work)["step"] == 3
    inode, said = os.stat(log).st_ino, []
    run(s, teacher=tiny_teacher(), log=said.append)
    assert any("log.jsonl: dropped 1 line (step 4)" in m for m in said), said
    assert log.read_bytes().splitlines(keepends=True)[:3] == before[:3]   # byte for byte
    assert os.stat(log).st_ino != inode          # a new file replaced it; never truncated in place
    mine, theirs = _log(s.work), _log(whole.work)
    assert [r["step"] for r in mine] == [1, 2, 3, 4, 5, 6]
    assert [(r["cosine"], r["contrastive"], r["lr"]) for r in mine] == \
        [(r["cosine"], r["contrastive"], r["lr"]) for r in theirs]


def test_a_half_written_last_line_and_foreign_lines_are_handled(tmp_path):
    """A crash mid-write leaves a line without its newline (the next append would join it); lines that
    are not the trainer's are kept."""
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=3, stop_after=1, log_every=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    log = Path(s.work) / LOG_FILE
    first = log.read_bytes()
    log.write_bytes(first + b"# a note of mine\n" + b'{"step": 2, "cosine": 0.5}\n' + b'{"step": 3, "cosi')
    s.stop_after, said = None, []
    run(s, teacher=tiny_teacher(), log=said.append)
    assert any("dropped 2 lines (step 2, a half-written line)" in m for m in said), said
    lines = log.read_bytes().splitlines(keepends=True)
    assert lines[0] == first and lines[1] == b"# a note of mine\n"
    assert [json.loads(x)["step"] for x in lines[2:]] == [2, 3]


def test_a_log_that_cannot_be_replaced_is_left_whole(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=3, stop_after=1, log_every=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    log = Path(s.work) / LOG_FILE
    log.write_bytes(log.read_bytes() + b'{"step": 2}\n')
    kept = log.read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    s.stop_after = None
    with pytest.raises(InputError, match=r"--work log '.*log.jsonl' could not be rewritten without the steps after 1"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert log.read_bytes() == kept and sorted(p.name for p in log.parent.iterdir()) == [LOG_FILE, RESUME_FILE]


def _rank_main_precision(rank, world, port, settings, errors):
    """Rank 1 resolves another precision, as ``auto`` does on a node of older GPUs."""
    from distill_fixtures import run_rank_reporting
    settings.precision = "fp16" if rank == 1 else "fp32"
    run_rank_reporting(rank, world, port, settings, errors)


def test_ranks_in_other_precisions_are_refused(tmp_path):
    """An fp16 rank skips overflowing steps that bf16 ranks take: their weights would part in silence."""
    from distill_fixtures import messages_of_two_ranks
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", batch=2, steps=1)
    said = messages_of_two_ranks(_rank_main_precision, lambda r: (s,), timeout=120)
    assert all("rank 0 trains in fp32 and rank 1 in fp16" in m for m in said), said
    assert not (Path(s.work) / RESUME_FILE).exists()
