"""The launch edge: who am I in a torchrun / SLURM / single-process job, and on which device.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (single and multi node, rendezvous included); a SLURM
``srun`` sets SLURM_PROCID, SLURM_NTASKS (and SLURM_STEP_NUM_TASKS) and SLURM_LOCALID, read as open_clip reads them
(MASTER_ADDR and MASTER_PORT must then be exported by the batch script). Nothing else in the trainer
looks at the environment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env=None) -> World:
    """This process's place in the job; torchrun's variables win over SLURM's.

    Under srun the size is SLURM_STEP_NUM_TASKS, the processes srun started: SLURM_NTASKS is the
    allocation's under ``srun --preserve-env``, and the ranks waited for ranks that never came."""
    env = os.environ if env is None else env
    slurm_size = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    for rank, size, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", slurm_size, "SLURM_LOCALID")):
        if rank in env and size in env:
            try:
                world = World(int(env[rank]), int(env.get(local, env[rank])), int(env[size]))
            except ValueError:
                raise InputError(f"{rank}={env[rank]!r}, {size}={env[size]!r} are not integers; "
                                 "expected the launcher's rank and world size") from None
            if not 0 <= world.rank < world.size:
                raise InputError(f"{rank}={world.rank} is outside 0..{world.size - 1} ({size}={world.size})")
            return world
    return World()


def check_launched(world: World, env=None) -> None:
    """A job of several processes was started by a launcher: a plain ``python`` in an sbatch script sees the
    batch step's SLURM_PROCID=0 and the job's SLURM_NTASKS, and rank 0 waited for ranks nothing started."""
    env = os.environ if env is None else env
    if world.size > 1 and "WORLD_SIZE" not in env and "SLURM_STEP_NUM_TASKS" not in env:
        raise InputError(f"SLURM_NTASKS={world.size} but this process was not started by srun (SLURM_STEP_NUM_TASKS "
                         f"is not set), so the other {world.size - 1} ranks would never come; expected "
                         "srun python -m latentclip.train distill ... (one process per task; srun --ntasks 1 for "
                         "one process) or torchrun")


def pick_device(world: World, device: str | None = None) -> torch.device:
    """``device`` if given, else this rank's GPU (LOCAL_RANK) when CUDA is there, else the CPU.

    A bare ``cuda`` also means this rank's GPU: without an index every rank would share one GPU, and
    ``torch.cuda.set_device`` refuses a device without an index (a ValueError before any work).
    """
    if device:
        try:
            picked = torch.device(device)
        except RuntimeError:   # e.g. "gpu": torch's message lists twenty device types, as a traceback
            raise InputError(f"--device {device!r} is not a device name; expected cpu, cuda or cuda:N "
                             "(the GPU's index)") from None
        if picked.type != "cuda" or picked.index is not None:
            return picked
    if device or torch.cuda.is_available():
        count = torch.cuda.device_count()
        return torch.device("cuda", world.local_rank % count if count else world.local_rank)
    return torch.device("cpu")


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) when the job has more than one process."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.size))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise InputError("MASTER_ADDR and MASTER_PORT are not set; launch with torchrun, or export them in the "
                         "SLURM batch script (the first node's host name and a free port)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)


def on_main(world: World, work, what: str):
    """``work()`` on rank 0 alone, its outcome told to every rank; returns its result (None on the others).

    When it raises, rank 0 raises its own error and the others a short InputError naming ``what``: they
    waited at the next collective for a rank that was gone, under srun until the NCCL timeout."""
    if world.size == 1:
        return work()
    done = [True]
    if world.is_main:
        try:
            result = work()
        except Exception:   # not KeyboardInterrupt: every rank gets Ctrl-C, none would answer
            dist.broadcast_object_list([False], src=0)
            raise
        dist.broadcast_object_list(done, src=0)
        return result
    dist.broadcast_object_list(done, src=0)
    if not done[0]:
        raise InputError(f"rank 0 failed to {what}; rank {world.rank} stops with it (rank 0's output says why)")
    return None


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order; this rank's rows keep their gradient (others do not).

    Used for the caption-contrastive term, whose negatives span the global batch. The loss built
    on the result must be multiplied by the world size: DDP averages the per-rank gradients, and
    each rank only backpropagates through its own rows.
    """
    if world.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[world.rank] = x
    return torch.cat(parts)
