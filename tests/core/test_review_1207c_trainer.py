"""Review of the distillation trainer's launch edge: SLURM's variables in a process that srun did not start.

Each test failed before its fix: a plain ``python -m latentclip.train distill`` in an sbatch script of 4
tasks read the batch step's SLURM_PROCID=0 and the job's SLURM_NTASKS=4 and waited in the process group
for 3 ranks nothing started (after a misleading "export MASTER_ADDR" error when it was not exported);
``srun --ntasks 1`` (or ``--preserve-env``) in a larger allocation waited for the allocation's task count.
"""
import sys
from pathlib import Path

import pytest
import torch.distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_fixtures import tiny_teacher, write_dataset  # noqa: E402
from test_distill_train import _settings  # noqa: E402

from latentclip.errors import InputError  # noqa: E402
from latentclip.train.distill import run  # noqa: E402
from latentclip.train import distributed  # noqa: E402
from latentclip.train.distributed import World, world_from_env  # noqa: E402

#: what an sbatch script of ``--ntasks 4`` gives its own process (Slurm's env_array_for_batch_job + setup_env)
BATCH_STEP = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_STEP_NUM_TASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def no_other_rank_comes(*args, **kwargs):
        raise AssertionError(f"joined a process group of {kwargs.get('world_size')} that no other process joins")
    monkeypatch.setattr(torch.distributed, "init_process_group", no_other_rank_comes)


def test_a_batch_script_without_srun_is_refused_at_once_not_left_waiting(tmp_path, monkeypatch):
    for var, value in BATCH_STEP.items():
        monkeypatch.setenv(var, value)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=1)
    with pytest.raises(InputError, match=r"^SLURM_NTASKS=4 but this process was not started by srun .* the other 3 "
                                         r"ranks would never come; expected srun python -m latentclip.train distill"):
        run(s, teacher=tiny_teacher(), log=lambda m: None)
    assert not Path(s.work).exists() and not Path(s.out).exists()   # before any work


def test_srun_with_one_task_in_a_larger_allocation_trains_as_one_process(tmp_path, monkeypatch):
    """srun exports the step's SLURM_STEP_NUM_TASKS; SLURM_NTASKS stays the allocation's under --preserve-env."""
    for var, value in {**BATCH_STEP, "SLURM_STEP_NUM_TASKS": "1"}.items():
        monkeypatch.setenv(var, value)
    data = write_dataset(tmp_path / "data", n=8)
    s = _settings(tmp_path, data, "run", steps=1)
    assert run(s, teacher=tiny_teacher(), log=lambda m: None) == Path(s.out)


def test_the_slurm_world_is_the_processes_srun_started():
    srun = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}
    assert world_from_env(srun) == World(1, 1, 2)
    distributed.check_launched(world_from_env(srun), srun)
    one_task_job = {**BATCH_STEP, "SLURM_NTASKS": "1"}    # sbatch --ntasks 1: plain python is the whole job
    distributed.check_launched(world_from_env(one_task_job), one_task_job)
    torchrun_in_a_batch_script = {**BATCH_STEP, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert world_from_env(torchrun_in_a_batch_script) == World(3, 3, 4)
    distributed.check_launched(World(3, 3, 4), torchrun_in_a_batch_script)
    with pytest.raises(InputError, match=r"^SLURM_NTASKS=4 but this process was not started by srun"):
        distributed.check_launched(world_from_env(BATCH_STEP), BATCH_STEP)


def test_a_device_name_torch_does_not_know_is_one_clear_error(capsys):
    """``--device gpu`` ended in torch's RuntimeError traceback listing twenty device types."""
    from latentclip.train.__main__ import main
    code = main(["distill", "--data", "d", "--teacher", "t", "--out", "o.safetensors", "--work", "w", "--device", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --device 'gpu' is not a device name; expected cpu, cuda or cuda:N "
                                 "(the GPU's index)"]
