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
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# the launch environment is read as densebench run reads it (one implementation)
from densebench.distributed import first_slurm_host, select_backend, slurm_environment  # noqa: F401


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
