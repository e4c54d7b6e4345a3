"""The NeCo loss: teacher-to-student cross-entropy between soft permutation matrices (spec §1.5-§1.6).

For each query patch, its similarities to R reference patches are sorted by a differentiable sorting
network, once from the student's features (P, with gradient) and once from the teacher's (Q, no
gradient). The loss is, for every reference r, the cross-entropy over ranks j from Q[r] to P[r]:

    loss = - 1/(N·R) Σ_n Σ_r Σ_j Q[n, r, j] · log P[n, r, j]

The reference code takes ``log P`` without a floor, so an entry that underflows to 0 gives -inf and,
where Q is 0 as well, NaN (spec §7.7). By default P is floored at the smallest normal float32
(``log_floor``), which changes nothing for entries that are representable and keeps the loss finite;
``log_floor=None`` is the literal reference behaviour.
"""

from __future__ import annotations

import torch

from densebench.errors import ConfigError

from .sorting import soft_sort

#: Default floor for P inside the log: the smallest normal float32, far below any P a 49-wide bitonic
#: sort at steepness 100 produces (~1e-6), so it only ever acts on underflowed entries.
DEFAULT_LOG_FLOOR = float(torch.finfo(torch.float32).tiny)


class _RankCrossEntropy(torch.autograd.Function):
    """-Σ Q·log max(P, floor) · scale, keeping only P and Q for backward (no log P or product tensors)."""

    @staticmethod
    def forward(ctx, perm: torch.Tensor, target: torch.Tensor, floor: float | None, scale: float):
        clamped = perm.clamp_min(floor) if floor is not None else perm
        # xlogy: 0·log 0 = 0 where the target is exactly 0 (only reachable with floor=None)
        loss = -torch.special.xlogy(target, clamped).sum() * scale
        ctx.save_for_backward(perm, target)
        ctx.floor, ctx.scale = floor, scale
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        perm, target = ctx.saved_tensors
        if ctx.floor is not None:
            grad = torch.where(perm >= ctx.floor, target / perm.clamp_min(ctx.floor), torch.zeros_like(perm))
        else:
            grad = target / perm
        return grad.mul_(-ctx.scale * grad_out), None, None, None


def rank_cross_entropy(perm: torch.Tensor, target: torch.Tensor, *,
                       log_floor: float | None = DEFAULT_LOG_FLOOR) -> torch.Tensor:
    """Mean over the (N, R) rows of ``-Σ_j target·log perm`` for (N, R, R) soft permutation matrices."""
    if perm.shape != target.shape or perm.ndim != 3:
        raise ConfigError(f"rank_cross_entropy needs two (N, R, R) tensors of one shape; got "
                          f"{tuple(perm.shape)} and {tuple(target.shape)}")
    rows = perm.shape[0] * perm.shape[1]
    return _RankCrossEntropy.apply(perm, target.detach().to(perm.dtype), log_floor, 1.0 / max(rows, 1))


def neighbor_ranking_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor, student_steepness: float,
                          teacher_steepness: float, network: str = "bitonic", distribution: str = "cauchy",
                          *, log_floor: float | None = DEFAULT_LOG_FLOOR) -> torch.Tensor:
    """Scalar NeCo loss for (N, R) student and teacher similarities of N queries to R references.

    ``-mean_{N,R} Σ_j Q[r, j] log P[r, j]`` with P = soft_sort(student_sim) and Q = soft_sort(teacher_sim)
    computed without gradient. Half-precision similarities are sorted in float32 (also under autocast).
    """
    if student_sim.ndim != 2 or student_sim.shape != teacher_sim.shape:
        raise ConfigError(f"neighbor_ranking_loss needs (N, R) student and teacher similarities of one shape; "
                          f"got {tuple(student_sim.shape)} and {tuple(teacher_sim.shape)}")
    with torch.autocast(student_sim.device.type, enabled=False):
        with torch.no_grad():
            _, target = soft_sort(teacher_sim.detach(), teacher_steepness, network, distribution)
        _, perm = soft_sort(student_sim, student_steepness, network, distribution)
        return rank_cross_entropy(perm, target, log_floor=log_floor)
