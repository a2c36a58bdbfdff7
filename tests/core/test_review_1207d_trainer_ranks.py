"""Review of the distillation trainer with several ranks: what rank 0 does alone must not strand the others.

Each case failed before its fix: rank 0 makes the --out and --work folders (before the process group
started), rewrites log.jsonl and writes --out; when that raised (--out made by another party during
training, a --work that cannot be made) the other ranks waited at the next collective (the group's
rendezvous, the final barrier). torchrun's agent kills them; under srun without --kill-on-bad-exit they
hung until the NCCL or rendezvous timeout (10-30 minutes).

A failed NCCL rank's process may stay up while the others wait (gloo would see its socket close and fail
them at once), so rank 0 here stays until rank 1 has ended or the test's time is up.
"""
import multiprocessing
import queue
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import messages_of_two_ranks, run_rank_reporting, write_dataset  # noqa: E402
from test_distill_train import _settings  # noqa: E402

from latentclip.train.distill import RESUME_FILE  # noqa: E402

USERS_FILE = b"the user's file"
JOIN_S = 60   # per rank; without the fix rank 1 waits 30 minutes


def _rank_main_rank0_fails(rank, world, port, settings, out_appears, ended, errors):
    """``out_appears``: another party writes --out just before rank 0's final save (which then refuses it)."""
    import latentclip.train.distill as distill
    if rank == 0 and out_appears:
        real = distill.save

        def save_after_another_party(model, out, **kw):
            Path(out).write_bytes(USERS_FILE)
            return real(model, out, **kw)
        distill.save = save_after_another_party
    try:
        run_rank_reporting(rank, world, port, settings, errors)
    except FileExistsError as e:   # the command line prints it as one sentence
        errors.put(f"rank {rank}: FileExistsError: {e}")
    finally:
        if rank == 0:
            ended.wait(timeout=3 * JOIN_S)
        else:
            ended.set()


@pytest.mark.parametrize("case", ["out appears during training", "work cannot be made"])
def test_when_rank_0_fails_alone_every_rank_stops_at_once(tmp_path, case):
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", batch=2, steps=2)
    if case == "work cannot be made":
        (tmp_path / "a-file").write_text("not a folder")
        s.work = str(tmp_path / "a-file" / "work")
    out_appears, ended = case == "out appears during training", multiprocessing.get_context("spawn").Event()
    try:
        said = messages_of_two_ranks(_rank_main_rank0_fails, lambda r: (s, out_appears, ended), timeout=JOIN_S)
    except queue.Empty:
        pytest.fail(f"a rank did not end within {JOIN_S} s of rank 0's failure")
    rank0 = (r"rank 0: FileExistsError: .*run.safetensors exists; refusing to overwrite it \(use --force\)$" if out_appears
             else r"rank 0: InputError: --work folder '.*a-file/work' cannot be created")
    assert re.match(rank0, said[0]), said
    assert re.match(r"rank 1: InputError: rank 0 failed to [^;]+; rank 1 stops with it \(rank 0's output says why\)$",
                    said[1]), said
    if out_appears:
        assert Path(s.out).read_bytes() == USERS_FILE and (Path(s.work) / RESUME_FILE).is_file()
        assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    else:
        assert not Path(s.out).exists()
