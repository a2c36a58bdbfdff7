"""Review of the distillation trainer and its shards: inputs that failed late, with a traceback, or silently.

Each test failed before its fix: a dataset under half the global batch (an empty rank slice), a bare
``--device cuda``, shards past the open-file limit, a shard removed while training, a long or
non-ASCII sample key, ``--save-every 0``, an uncreatable ``--work``, ranks that indexed other shards.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import tiny_teacher, write_dataset  # noqa: E402
from test_distill_train import _run_ranks, _settings  # noqa: E402

from latentclip.errors import InputError  # noqa: E402
from latentclip.train.distill import global_rows, run  # noqa: E402
from latentclip.train.distributed import World, pick_device  # noqa: E402
from latentclip.train.shards import FORMAT, MANIFEST, Sample, ShardIndex, tar_members, write_shard  # noqa: E402


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("n, global_batch", [(2, 8), (3, 8), (5, 11), (100, 2048)])
def test_a_global_batch_is_full_even_with_fewer_samples_than_half_of_it(n, global_batch):
    """One copy of the permutation topped up a batch to at most 2n rows; ranks past them got none."""
    for step in range(3):
        rows = global_rows(step, n, global_batch, seed=1)
        assert len(rows) == global_batch
        counts = np.bincount(rows, minlength=n)
        assert counts.max() - counts.min() <= 1     # every sample as often as the others, give or take one


def test_two_ranks_train_on_a_dataset_smaller_than_the_global_batch(tmp_path):
    """2 samples, 2 ranks x batch 4: rank 1's slice was empty and it failed (np.stack of nothing)."""
    data = write_dataset(tmp_path / "data", n=2)
    s = _settings(tmp_path, data, "small", batch=4, steps=2)
    _run_ranks(s)
    assert Path(s.out).is_file()


def test_a_bare_cuda_device_is_this_ranks_gpu():
    """``--device cuda`` under torchrun put every rank on one GPU, and torch.cuda.set_device refused it."""
    from torch._utils import _get_device_index   # what torch.cuda.set_device calls first
    for local in (0, 1, 3):
        picked = pick_device(World(local, local, 4), "cuda")
        assert picked.type == "cuda" and _get_device_index(picked) == picked.index
        if torch.cuda.device_count() == 0:
            assert picked.index == local
    assert pick_device(World(1, 1, 2), "cuda:0") == torch.device("cuda", 0)   # an explicit index is kept
    assert pick_device(World(1, 1, 2), "cpu") == torch.device("cpu")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_the_index_holds_a_bounded_number_of_shards_open(tmp_path):
    """One open file per shard ever read: 1000+ shards (1M images at --shard-size 1000) passed ulimit -n."""
    data = write_dataset(tmp_path / "data", n=150, per_shard=1)
    index = ShardIndex(data)
    before = _open_files()
    try:
        for i in np.random.default_rng(0).permutation(len(index)):
            assert index[int(i)].latent.shape == (16, 8, 8)
        assert _open_files() - before <= 100
    finally:
        index.close()
    assert _open_files() <= before


def test_a_shard_removed_while_training_is_one_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data", n=20, per_shard=10)
    index = ShardIndex(data)
    (data / "000001.tar").unlink()
    with pytest.raises(InputError, match=r"shard '000001.tar' could not be opened \(No such file or directory\)"):
        index[15]
    assert index[3].key == "s0003"
    index.close()


def test_long_and_non_ascii_sample_keys_are_written_and_read_back(tmp_path):
    """ustar holds 100 bytes of name: a long image file name failed the shard after all its images were encoded."""
    keys = ["short", "holiday_2019_" + "x" * 90, "caf\u00e9_" * 30, "d" * 1500, "\u00fcn\u00efcode"]
    rng = np.random.default_rng(0)
    samples = [Sample(k, rng.standard_normal((4, 2, 2)).astype(np.float32), np.ones(3, np.float32), f"caption {i}",
                      {"i": i}) for i, k in enumerate(keys)]
    assert write_shard(tmp_path / "000000.tar", samples) == len(keys)
    assert set(tar_members(tmp_path / "000000.tar")) == set(keys)
    (tmp_path / MANIFEST).write_text(f'{{"format": "{FORMAT}", "latent_shape": [4, 2, 2], "teacher": {{"embed_dim": 3}}}}')
    index = ShardIndex(tmp_path)
    got = {index[i].key: index[i] for i in range(len(index))}
    assert set(got) == set(keys)
    for i, k in enumerate(keys):
        assert got[k].meta == {"i": i} and got[k].caption == f"caption {i}"
        np.testing.assert_array_equal(got[k].latent, samples[i].latent.astype(np.float16))
    index.close()


def test_save_every_zero_is_one_clear_error_before_training(tmp_path, capsys):
    """It divided the step count: a ZeroDivisionError traceback after the first step."""
    data = write_dataset(tmp_path / "data", n=8)
    for kw, says in (({"save_every": 0}, "--save-every 0"), ({"log_every": 0}, "--log-every 0")):
        s = _settings(tmp_path, data, "run", **kw)
        with pytest.raises(InputError, match=f"{says} .*must be at least 1"):
            run(s, teacher=tiny_teacher(), log=lambda m: None)
        assert not (Path(s.work) / "resume.pt").exists()


def test_a_work_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    (tmp_path / "a-file").write_text("not a folder")
    s = _settings(tmp_path, data, "run", work=str(tmp_path / "a-file" / "work"))
    with pytest.raises(InputError, match=r"--work folder '.*a-file/work' cannot be created"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)


def _rank_main_seeing(rank, world, port, settings, drop_last, errors):
    """A rank whose folder listing lacks the last shard (an encode still renaming it into place)."""
    import latentclip.train.shards as shards
    from distill_fixtures import run_rank_reporting
    if drop_last:
        listed = shards.shard_paths
        shards.shard_paths = lambda folder: listed(folder)[:-1]
    run_rank_reporting(rank, world, port, settings, errors)


def test_ranks_that_indexed_other_shards_are_refused(tmp_path):
    """Each rank computes the data order from its own index: other sample counts trained silently on
    overlapping and missing samples."""
    data = write_dataset(tmp_path / "data", n=24, per_shard=10)
    s = _settings(tmp_path, data, "run", batch=2, steps=2)
    from distill_fixtures import messages_of_two_ranks
    said = messages_of_two_ranks(_rank_main_seeing, lambda r: (s, r == 1))
    assert all("the ranks see different shards in --data: rank 0 24 samples in 3 shards, rank 1 20 in 2" in m
               for m in said), said
    assert not Path(s.out).exists()
