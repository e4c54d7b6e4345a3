"""torch.distributed set-up for ``torchrun --nproc_per_node N -m neco_train ...`` and for SLURM's ``srun``
(NCCL on GPU, gloo on CPU).

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (torchrun sets it, as does the test
harness that spawns processes), or, without ``WORLD_SIZE``, when SLURM's ``srun`` started several tasks
(``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR``
defaults to the first node of the step, ``MASTER_PORT`` to a port derived from the job id). Everything
else in the trainer asks this object, never ``torch.distributed`` directly, so a single process needs no
process group at all.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    #: the training device; reductions run there (NCCL cannot reduce CPU tensors). Set by the trainer.
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors from every rank along dim 0, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (for logging and for agreeing on a non-finite loss), on the device."""
        if not self.enabled:
            return value
        value = value.to(self.device).clone() if self.device is not None else value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def select_backend(device: str) -> str:
    """NCCL when training runs on CUDA (``--device cuda[:N]``, or ``auto`` with a GPU), else gloo."""
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda and torch.cuda.is_available() else "gloo"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,010],cpu01`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """torchrun-style variables for a task that ``srun`` started, or None when this is not such a task.

    ``WORLD_SIZE`` set (torchrun, or a launcher of its own) wins; so does a single-task step."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return None
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if int(world) <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(job) % 20000)}


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``) or srun
    (``SLURM_*``, see :func:`slurm_environment`) describes."""
    slurm = slurm_environment()
    if slurm is not None:
        os.environ.update(slurm)  # init_process_group's env:// rendezvous reads them
        if slurm["RANK"] == "0":
            print(f"neco_train: srun task 0 of {slurm['WORLD_SIZE']}, rendezvous at "
                  f"{slurm['MASTER_ADDR']}:{slurm['MASTER_PORT']}", file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return DistContext(rank, world, local_rank, initialized_here=False)
    dist.init_process_group(backend=select_backend(device), rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, initialized_here=True)
