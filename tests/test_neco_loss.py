"""neighbor_ranking_loss against the literal formula on diffsort's permutation matrices."""

import pytest
import torch

from densebench.errors import ConfigError
from neco_train.loss import neighbor_ranking_loss, rank_cross_entropy

diffsort = pytest.importorskip("diffsort")


def _literal(student, teacher, bs, bt, network="bitonic"):
    n = student.shape[1]
    with torch.no_grad():
        q = diffsort.DiffSortNet(network, n, steepness=bt)(teacher)[1]
    p = diffsort.DiffSortNet(network, n, steepness=bs)(student)[1]
    # -mean over (query, reference) of sum over ranks j of Q log P, written out
    total = 0.0
    for b in range(p.shape[0]):
        for r in range(n):
            total = total - (q[b, r] * torch.log(p[b, r])).sum()
    return total / (p.shape[0] * n)


@pytest.mark.parametrize("bs,bt", [(100.0, 100.0), (10.0, 1000.0)])
@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_loss_and_gradient_equal_the_literal_formula(bs, bt, network):
    gen = torch.Generator().manual_seed(0)
    student = (torch.rand(4, 9, generator=gen, dtype=torch.float64) * 2 - 1)
    teacher = (student + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    t2 = teacher.clone().requires_grad_()
    expected = _literal(s1, teacher, bs, bt, network)
    got = neighbor_ranking_loss(s2, t2, bs, bt, network)
    expected.backward()
    got.backward()
    assert got.ndim == 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-8, atol=1e-10)
    assert t2.grad is None or bool((t2.grad == 0).all())  # the teacher side is a constant target


def test_loss_is_minimal_when_student_ranks_like_teacher():
    """Cross-entropy: with equal steepness, P = Q is better than a permuted student."""
    gen = torch.Generator().manual_seed(1)
    sims = torch.rand(16, 49, generator=gen) * 2 - 1
    same = neighbor_ranking_loss(sims, sims, 100.0, 100.0)
    other = neighbor_ranking_loss(sims[:, torch.randperm(49, generator=gen)], sims, 100.0, 100.0)
    assert float(same) < float(other)


def test_log_floor_keeps_underflowed_entries_finite():
    perm = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    loss = rank_cross_entropy(perm, target)  # 0·log(0) handled, no NaN
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(perm.grad).all()
    hard_target = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    floored = rank_cross_entropy(perm.detach(), hard_target)
    assert torch.isfinite(floored) and float(floored) > 40  # -0.5·log(tiny) ≈ 43.7 per row
    assert torch.isinf(rank_cross_entropy(perm.detach(), hard_target, log_floor=None))  # the reference: -log 0


def test_shape_errors():
    with pytest.raises(ConfigError, match=r"\(3, 4\)"):
        neighbor_ranking_loss(torch.rand(3, 4), torch.rand(3, 5), 10.0, 10.0)
