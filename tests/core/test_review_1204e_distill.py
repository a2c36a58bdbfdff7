"""Review of the distillation trainer and encode: resume across ranks, refusals that named no flag,
settings that trained silently wrong, and an encode input list that always failed.

Each test failed before its fix: a rank that found no resume file trained from step 0 beside rank 0's
resumed weights; a resume with another global batch said only "global_batch"; an --out folder was
told to use --force; a negative --grad-clip reversed every gradient; two image folders always failed;
``--data .`` left the output's data folder unnamed.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import tiny_teacher, write_dataset  # noqa: E402
from test_distill_train import _run_ranks, _settings  # noqa: E402

from latentclip.encode import plan_jobs  # noqa: E402
from latentclip.errors import InputError  # noqa: E402
from latentclip.train.__main__ import main  # noqa: E402
from latentclip.train.distill import RESUME_FILE, run  # noqa: E402


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


class _RankFolder(os.PathLike):
    """A --work that is another folder on every rank, as a node's own disk is."""

    def __init__(self, paths):
        self.paths = paths

    def __fspath__(self):
        return str(self.paths[int(os.environ.get("RANK", "0"))])


def test_ranks_that_resume_at_different_steps_are_refused(tmp_path):
    """--work on a node's own disk: rank 0 found resume.pt, rank 1 none. Rank 1 trained from step 0 and
    its weights diverged from rank 0's in silence (and with more steps left it hung in DDP)."""
    data = write_dataset(tmp_path / "data", n=16)
    first = _settings(tmp_path, data, "shared", batch=4, steps=3, stop_after=1)
    run(first, teacher=tiny_teacher(), log=lambda m: None)
    assert (Path(first.work) / RESUME_FILE).is_file()
    both = _settings(tmp_path, data, "shared", batch=2, steps=3, stop_after=1,
                     work=_RankFolder([first.work, tmp_path / "node1"]))
    with pytest.raises(AssertionError, match=r"InputError: rank 0 resumes at step 1 and rank 1 at step 0: .*expected "
                                             r"--work on a file system every node sees"):
        _run_ranks(both)
    assert torch.load(Path(first.work) / RESUME_FILE, weights_only=True)["step"] == 1   # untouched


def test_a_resume_with_another_global_batch_names_the_flag_and_both_values(tmp_path):
    """It said "other settings (global_batch)": no flag, and not what the run had."""
    data = write_dataset(tmp_path / "data", n=16)
    s = _settings(tmp_path, data, "run", batch=4, steps=3, stop_after=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    s.batch = 2
    with pytest.raises(InputError, match=r"other settings \(global_batch\): the global batch \(--batch x processes\) "
                                         r"was 4, now 2; use another --work folder"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    s.batch, s.lr = 4, 1e-2
    with pytest.raises(InputError, match=r"other settings \(lr\): --lr was 0.002, now 0.01;"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)


def test_an_out_folder_is_named_as_a_folder_without_force(tmp_path):
    """It was told to use --force, and with --force that it is a folder."""
    data = write_dataset(tmp_path / "data", n=8)
    folder = tmp_path / "latent_clip"
    folder.mkdir()
    s = _settings(tmp_path, data, "run", out=str(folder))
    with pytest.raises(InputError, match=r"is a folder; expected the Latent-CLIP file"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)


@pytest.mark.parametrize("field, value, says", [("grad_clip", -1.0, "--grad-clip -1"), ("warmup", -10, "--warmup -10"),
                                                ("contrastive_weight", -0.5, "--contrastive-weight -0.5"),
                                                ("weight_decay", -0.1, "--weight-decay -0.1"), ("lr", 0.0, "--lr 0"),
                                                ("lr", float("nan"), "--lr nan"), ("stop_after", 0, "--stop-after 0")])
def test_settings_outside_their_range_are_one_clear_error_before_training(tmp_path, field, value, says):
    """A negative --grad-clip (meant as "off") made clip_grad_norm_ multiply every gradient by a negative
    factor: the run ascended the loss for hours. The others trained silently wrong or not at all."""
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=1, **{field: value})
    with pytest.raises(InputError, match=f"{says} .*expected"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert not (Path(s.work) / RESUME_FILE).exists() and not Path(s.out).exists()


def test_a_negative_grad_clip_is_refused_on_the_command_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run")
    argv = ["distill", "--data", s.data, "--teacher", str(tmp_path / "unused.safetensors"), "--out", s.out,
            "--work", s.work, "--config", s.config, "--grad-clip", "-1"]
    assert main(argv) == 2
    assert "--grad-clip -1 must be at least 0 (0: no clipping)" in capsys.readouterr().err


def test_two_image_folders_encode_into_distinct_shards(tmp_path):
    """``encode FOLDER1 FOLDER2`` (the argument takes several folders) always failed: both folders' first
    shard was 000000.tar, refused as "give tars with distinct names"."""
    for name, count in (("part1", 3), ("part2", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"img{i}.png").write_bytes(b"")
    jobs = plan_jobs([tmp_path / "part1", tmp_path / "part2"], shard_size=2)
    assert [j.out_name for j in jobs] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [[str(src.relative_to(tmp_path)) for _, src, _, _ in j.items()] for j in jobs] == \
        [["part1/img0.png", "part1/img1.png"], ["part1/img2.png"], ["part2/img0.png", "part2/img1.png"]]
    # one folder keeps its names (an earlier run's shards still resume)
    assert [j.out_name for j in plan_jobs([tmp_path / "part1"], shard_size=2)] == ["000000.tar", "000001.tar"]
    # two tar inputs of one name are refused naming both
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000.tar").write_bytes(b"")
    with pytest.raises(InputError, match=r"inputs '.*a/00000.tar' and '.*b/00000.tar' would both write shard 00000.tar"):
        plan_jobs([tmp_path / "a", tmp_path / "b"])
    # a folder given twice, or inside another input, would be encoded twice
    (tmp_path / "part1" / "sub").mkdir()
    for twice in ([tmp_path / "part1", tmp_path / "part1"], [tmp_path / "part1", tmp_path / "part1" / "sub"]):
        with pytest.raises(InputError, match=r"input '.*part1' holds input '.*part1(/sub)?' \(or is it\)"):
            plan_jobs(twice)


def test_the_output_names_the_data_folder_when_given_as_dot(tmp_path, monkeypatch):
    """Run from inside the shards' folder (--data .), the file's metadata named the data folder ''."""
    import json
    from latentclip.checkpoints import read_safetensors_header
    data = write_dataset(tmp_path / "flux-shards", n=8)
    s = _settings(tmp_path, data, "run", steps=1)
    monkeypatch.chdir(data)
    s.data = "."
    assert run(s, teacher=tiny_teacher(), log=lambda m: None) == Path(s.out)
    meta = read_safetensors_header(Path(s.out))["__metadata__"]
    assert json.loads(meta["data"])["folder"] == "flux-shards"
    assert (meta["steps"], meta["vae_family"], json.loads(meta["teacher"])["model"]) == ("1", "flux", "tiny-teacher")


def test_a_non_finite_step_stops_and_keeps_the_last_good_resume_file(tmp_path, monkeypatch):
    """A diverged step made every weight NaN, training went on, and the next save replaced the good resume.pt."""
    import latentclip.train.distill as distill
    data = write_dataset(tmp_path / "data", n=16)
    s = _settings(tmp_path, data, "run", batch=4, steps=3, save_every=1)
    real, calls = distill.cosine_regression, []

    def diverging(student, teacher):
        calls.append(1)
        loss = real(student, teacher)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(distill, "cosine_regression", diverging)
    with pytest.raises(InputError, match=r"^step 2: the gradients are not finite \(cosine loss nan, contrastive loss [0-9.]+\); nothing was saved"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    state = torch.load(Path(s.work) / RESUME_FILE, weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["visual"].values())
    assert not Path(s.out).exists()
