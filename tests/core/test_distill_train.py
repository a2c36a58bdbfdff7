"""The distillation trainer on CPU with gloo: DDP equivalence, epoch coverage, resume, and clear errors.

Real parts throughout: open_clip CLIPs, tar shards on disk, torch.distributed with two forked
processes. Models are tiny so each test runs in seconds.
"""
import multiprocessing
import os
import socket
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import student_config_file, tiny_teacher, write_dataset  # noqa: E402

import latentclip  # noqa: E402
from latentclip.errors import InputError  # noqa: E402
from latentclip.train.distill import (RESUME_FILE, Settings, build_student, global_rows, load_teacher, run,  # noqa: E402
                                      steps_per_epoch, student_config)
from latentclip.families import get_family  # noqa: E402


def _settings(root: Path, data: Path, name: str, **kw) -> Settings:
    base = dict(data=str(data), teacher="", out=str(root / f"{name}.safetensors"), work=str(root / name),
                config=str(student_config_file(root)), batch=4, steps=3, lr=2e-3, warmup=1, log_every=100,
                contrastive_weight=0.5, device="cpu")   # CPU tests (gloo); unset, a GPU machine's CUDA would be picked
    base.update(kw)                                          # and a forked rank cannot initialise CUDA again
    return Settings(**base)


def _visual_state(work: Path) -> dict:
    return torch.load(work / RESUME_FILE, map_location="cpu", weights_only=True)["visual"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, settings, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run(settings, teacher=tiny_teacher(), log=lambda m: None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def _run_ranks(settings: Settings, world: int = 2) -> None:
    ctx = multiprocessing.get_context("spawn")   # fork breaks where CUDA or autograd threads already run (a GPU machine)
    errors, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, settings, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert all(p.exitcode == 0 for p in procs), errors.get() if not errors.empty() else [p.exitcode for p in procs]


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path, monkeypatch):
    """DDP's averaged gradients plus the global-batch contrastive term make 2 x B train exactly as 1 x 2B."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    data = write_dataset(tmp_path / "data", n=24)
    two = _settings(tmp_path, data, "two", batch=3, steps=3)
    _run_ranks(two)
    one = _settings(tmp_path, data, "one", batch=6, steps=3)
    run(one, teacher=tiny_teacher(), log=lambda m: None)
    a, b = _visual_state(Path(two.work)), _visual_state(Path(one.work))
    torch.manual_seed(one.seed)  # the start, built as run() builds it: training moved it far beyond the tolerance
    start = build_student(student_config(one.config, tiny_teacher(), get_family("flux")), tiny_teacher())[0]
    moved = {k: (a[k] - v).abs().max().item() for k, v in start.clip.visual.state_dict().items()}
    assert min(moved["conv1.weight"], moved["proj"], moved["transformer.resblocks.1.mlp.c_fc.weight"]) > 1e-3, moved
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    # and both wrote a loadable 16-channel Latent-CLIP
    for s in (two, one):
        model = latentclip.load(s.out)
        assert (model.vae_family, model.latent_channels) == ("flux", 16)


def test_two_processes_differ_from_one_process_of_batch_b(tmp_path, monkeypatch):
    """The equivalence above is not trivial: a single process at batch B (half the data per step) differs."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    data = write_dataset(tmp_path / "data", n=24)
    small = _settings(tmp_path, data, "small", batch=3, steps=3)
    big = _settings(tmp_path, data, "big", batch=6, steps=3)
    for s in (small, big):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    a, b = _visual_state(Path(small.work)), _visual_state(Path(big.work))
    assert not torch.allclose(a["conv1.weight"], b["conv1.weight"], atol=1e-5)


@pytest.mark.parametrize("n, world, batch", [(24, 2, 3), (24, 1, 6), (23, 2, 4), (7, 4, 1)])
def test_every_sample_is_seen_once_per_epoch_across_ranks(n, world, batch):
    """Rank slices of each global batch partition the epoch: each sample once (plus the top-up of the
    last batch when N is not a multiple of the global batch, taken from the epoch's own start)."""
    g = world * batch
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps_per_epoch(n, g), (epoch + 1) * steps_per_epoch(n, g)):
            rows = global_rows(step, n, g, seed=5)
            for rank in range(world):
                seen += list(rows[rank * batch:(rank + 1) * batch])
        counts = np.bincount(seen, minlength=n)
        assert counts.min() == 1 and counts.sum() == steps_per_epoch(n, g) * g
        assert (counts > 1).sum() == steps_per_epoch(n, g) * g - n
    assert not np.array_equal(global_rows(0, n, g, 5), global_rows(steps_per_epoch(n, g), n, g, 5)) or n <= g


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    data = write_dataset(tmp_path / "data", n=20)
    whole = _settings(tmp_path, data, "whole", steps=5)
    assert run(whole, teacher=tiny_teacher(), log=lambda m: None) == Path(whole.out)
    parts = _settings(tmp_path, data, "parts", steps=5, stop_after=2)
    assert run(parts, teacher=tiny_teacher(), log=lambda m: None) is None  # stopped early: no model yet
    assert not Path(parts.out).exists()
    lines = []
    assert run(parts, teacher=tiny_teacher(), log=lines.append) is None  # steps 3-4
    assert "resuming at step 2" in lines[0]
    parts.stop_after = None
    assert run(parts, teacher=tiny_teacher(), log=lambda m: None) == Path(parts.out)
    a, b = _visual_state(Path(whole.work)), _visual_state(Path(parts.work))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = torch.load(Path(parts.work) / RESUME_FILE, weights_only=True)
    assert state["step"] == 5
    meta = latentclip.checkpoints.read_safetensors_header(Path(parts.out))["__metadata__"]
    assert meta["steps"] == "5" and meta["vae_family"] == "flux" and '"tiny-teacher"' in meta["teacher"]


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=3, stop_after=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    s.lr = 1e-2
    with pytest.raises(InputError, match=r"holds a run with other settings \(lr\)"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)


def test_truncated_shard_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=20)
    shard = data / "000001.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(InputError, match=r"shard '000001.tar' is not a readable tar file"):
        run(_settings(tmp_path, data, "run"), teacher=tiny_teacher(), log=lambda m: None)


def test_shard_with_a_sample_lacking_its_embedding_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=10)
    with tarfile.open(data / "000001.tar", "w") as tar:  # a latent without its teacher embedding
        src = tarfile.open(data / "000000.tar")
        member = src.getmember("s0000.latent.npy")
        tar.addfile(member, src.extractfile(member))
    with pytest.raises(InputError, match=r"shard '000001.tar' sample 's0000' lacks teacher.npy"):
        run(_settings(tmp_path, data, "run"), teacher=tiny_teacher(), log=lambda m: None)


def test_sample_of_the_wrong_shape_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    manifest = (data / "encode.json").read_text().replace("[16, 8, 8]", "[4, 8, 8]")
    (data / "encode.json").write_text(manifest)
    with pytest.raises(InputError, match=r"has a latent of shape \[16, 8, 8\].*encode.json says \[4, 8, 8\]"):
        run(_settings(tmp_path, data, "run"), teacher=tiny_teacher(), log=lambda m: None)


def test_teacher_file_that_does_not_load_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(InputError, match=r"teacher file 'teacher.safetensors' does not load: .*not valid JSON"):
        load_teacher(bad)
    data = write_dataset(tmp_path / "data", n=8)
    from latentclip.train.__main__ import main
    code = main(["distill", "--data", str(data), "--teacher", str(bad), "--out", str(tmp_path / "o.safetensors"),
                 "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: teacher file 'teacher.safetensors' does not load")


def test_teacher_other_than_the_shards_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    other = tiny_teacher()
    other.name = "ViT-B-32"
    with pytest.raises(InputError, match=r"hold embeddings of teacher tiny-teacher .* --teacher is ViT-B-32"):
        run(_settings(tmp_path, data, "run"), teacher=other, log=lambda m: None)


def test_existing_output_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run")
    Path(s.out).write_bytes(b"the user's file")
    with pytest.raises(InputError, match="exists; refusing to overwrite"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert Path(s.out).read_bytes() == b"the user's file"


def test_world_comes_from_torchrun_first_then_slurm_then_one_process():
    from latentclip.train.distributed import World, world_from_env
    assert world_from_env({}) == World(0, 0, 1)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert world_from_env(slurm) == World(9, 1, 16)
    assert world_from_env({**slurm, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == World(3, 3, 4)
    with pytest.raises(InputError, match=r"RANK=5 is outside 0..3"):
        world_from_env({"RANK": "5", "WORLD_SIZE": "4"})


def test_shards_without_samples_are_one_clear_error(tmp_path, monkeypatch):
    """img2dataset shards of failed downloads encode to empty shards: nothing to train on, said once."""
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=4)
    from latentclip.train.shards import write_shard
    write_shard(data / "000000.tar", [])
    with pytest.raises(InputError, match=r"hold no samples"):
        run(_settings(tmp_path, data, "run"), teacher=tiny_teacher(), log=lambda m: None)


def test_shards_grown_since_the_run_began_are_refused_and_older_resume_files_still_resume(tmp_path, monkeypatch):
    """Shards added to --data change the data order, so a resumed run would not equal an uninterrupted one."""
    import json
    from latentclip.train.shards import write_shard
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=3, stop_after=1)
    run(s, teacher=tiny_teacher(), log=lambda m: None)
    resume = Path(s.work) / RESUME_FILE
    state = torch.load(resume, weights_only=True)
    extra = write_dataset(tmp_path / "more", n=4, seed=1)
    (extra / "000000.tar").rename(data / "000009.tar")
    with pytest.raises(InputError, match=r"other settings \(data_samples, data_shards\)"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    (data / "000009.tar").unlink()
    # a resume file written before the data size was part of the fingerprint resumes as before
    old = {k: v for k, v in json.loads(state["fingerprint"]).items() if k not in ("data_samples", "data_shards")}
    torch.save({**state, "fingerprint": json.dumps(old, sort_keys=True)}, resume)
    lines = []
    assert run(s, teacher=tiny_teacher(), log=lines.append) is None
    assert "resuming at step 1" in lines[0]


def test_teacher_with_other_weights_than_the_shards_one_is_refused(tmp_path, monkeypatch):
    """Same architecture and name, other weights: the shards' manifest records the weights' fingerprint."""
    import json
    from latentclip.train.distill import teacher_fingerprint
    from latentclip.train.shards import MANIFEST
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["teacher"]["fingerprint"] = teacher_fingerprint(tiny_teacher(seed=0).model)
    (data / MANIFEST).write_text(json.dumps(manifest))
    assert teacher_fingerprint(tiny_teacher(seed=0).model) != teacher_fingerprint(tiny_teacher(seed=1).model)
    with pytest.raises(InputError, match=r"holds other weights of the same architecture"):
        run(_settings(tmp_path, data, "other"), teacher=tiny_teacher(seed=1), log=lambda m: None)
    s = _settings(tmp_path, data, "same", steps=1)
    assert run(s, teacher=tiny_teacher(seed=0), log=lambda m: None) == Path(s.out)


def test_output_folder_is_made_before_training(tmp_path, monkeypatch):
    """A ComfyUI without models/latent_clip yet: the folder is made at the start, the file written at the end."""
    monkeypatch.delenv("RANK", raising=False)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=1, out=str(tmp_path / "ComfyUI" / "models" / "latent_clip" / "x.safetensors"))
    assert run(s, teacher=tiny_teacher(), log=lambda m: None) == Path(s.out) and Path(s.out).is_file()
    folder = _settings(tmp_path, data, "dir", out=str(tmp_path / "ComfyUI" / "models" / "latent_clip"), force=True)
    with pytest.raises(InputError, match=r"is a folder; expected the Latent-CLIP file"):
        run(folder, teacher=tiny_teacher(), log=lambda m: None)


def test_a_tar_holding_one_member_twice_is_one_clear_error(tmp_path):
    import io
    from latentclip.train.shards import tar_members
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("000000001.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(InputError, match=r"holds member '000000001.jpg' twice"):
        tar_members(path)
