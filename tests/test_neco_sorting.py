"""soft_sort against diffsort 0.2.0 (the sorter NeCo pins), against autograd's numeric gradients,
and against the properties a relaxed sort must have."""

import pytest
import torch

from densebench.errors import ConfigError
from neco_train import sorting
from neco_train.sorting import DISTRIBUTIONS, soft_sort

diffsort = pytest.importorskip("diffsort")


def _reference(x, steepness, network, distribution="cauchy"):
    return diffsort.DiffSortNet(network, x.shape[1], steepness=steepness, distribution=distribution)(x)


def _both(x, steepness, network, distribution="cauchy"):
    """Values, P and input gradients of both implementations under the same random loss."""
    gen = torch.Generator().manual_seed(1)
    w_perm = torch.randn(x.shape[0], x.shape[1], x.shape[1], generator=gen, dtype=x.dtype)
    w_vals = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    out = []
    for fn in (_reference, soft_sort):
        leaf = x.clone().requires_grad_(True)
        values, perm = fn(leaf, steepness, network, distribution)
        ((perm * w_perm).sum() + (values * w_vals).sum()).backward()
        out.append((values.detach(), perm.detach(), leaf.grad))
    return out


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [2, 5, 16, 49])
@pytest.mark.parametrize("steepness", [1.0, 10.0, 100.0, 1000.0])
def test_matches_diffsort_float64(network, n, steepness):
    x = torch.rand(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 2 - 1
    (v_ref, p_ref, g_ref), (v, p, g) = _both(x, steepness, network)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9 * g_ref.abs().max().item())


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_matches_diffsort_float32_neco_setting(network):
    """The NeCo setting: cosine similarities in [-1, 1], 49 references, steepness 100, float32."""
    x = torch.rand(40, 49, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (v_ref, p_ref, g_ref), (v, p, g) = _both(x, 100.0, network)
    assert (p - p_ref).abs().max().item() < 1e-5
    assert (v - v_ref).abs().max().item() < 1e-5
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_distribution_matches_diffsort(distribution):
    x = torch.rand(5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    (_, p_ref, g_ref), (_, p, g) = _both(x, 20.0, "bitonic", distribution)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-12)
    # diffsort's gaussian backward keeps sigma as a float32 tensor: agreement is to ~1e-7 there
    tol = 1e-6 if distribution == "gaussian" else 1e-9
    torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_gradcheck(network):
    """Numerical gradients of a loss through both outputs (independent of diffsort)."""
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    w = torch.randn(3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def f(v):
        values, perm = soft_sort(v, 3.0, network)
        return (perm * w).sum() + values.pow(2).sum()

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_relaxed_sort_properties():
    x = torch.rand(8, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    values, perm = soft_sort(x, 100.0)
    ones = torch.ones(8, 13, dtype=torch.float64)
    torch.testing.assert_close(perm.sum(1), ones)  # doubly stochastic
    torch.testing.assert_close(perm.sum(2), ones)
    torch.testing.assert_close(values, torch.einsum("bi,bij->bj", x, perm))  # sorted = x @ P
    # steep enough, P is the hard permutation of an ascending argsort
    _, hard = soft_sort(x, 1e9)
    order = x.argsort(dim=1)
    expected = torch.zeros_like(hard)
    expected.scatter_(1, order.unsqueeze(1), 1.0)  # P[order[j], j] = 1
    torch.testing.assert_close(hard, expected, rtol=0, atol=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    x = torch.rand(4, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    w = torch.randn(4, 49, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    results = []
    for budget in (1, 1 << 30):  # one row per chunk vs all rows at once
        monkeypatch.setattr(sorting, "_CPU_CHUNK_ELEMENTS", budget)
        monkeypatch.setattr(sorting, "_CPU_BACKWARD_CHUNK_ELEMENTS", budget)
        leaf = x.clone().requires_grad_(True)
        _, perm = soft_sort(leaf, 50.0)
        (perm * w).sum().backward()
        results.append((perm.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-14)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_half_precision_is_sorted_in_float32():
    x = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) * 2 - 1
    values, perm = soft_sort(x.to(torch.bfloat16), 100.0)
    assert values.dtype == perm.dtype == torch.float32
    _, p32 = soft_sort(x.to(torch.bfloat16).float(), 100.0)
    torch.testing.assert_close(perm, p32)


def test_values_only_and_trivial_sizes():
    x = torch.rand(3, 9, generator=torch.Generator().manual_seed(4))
    values, perm = soft_sort(x, 100.0, return_permutation=False)
    assert perm.numel() == 0
    torch.testing.assert_close(values, soft_sort(x, 100.0)[0])
    one, p1 = soft_sort(x[:, :1], 100.0)
    torch.testing.assert_close(one, x[:, :1])
    assert p1.shape == (3, 1, 1) and bool((p1 == 1).all())


def test_bad_arguments_name_the_value():
    x = torch.rand(2, 4)
    with pytest.raises(ConfigError, match="'quick'"):
        soft_sort(x, 10.0, network="quick")
    with pytest.raises(ConfigError, match="'softmax'"):
        soft_sort(x, 10.0, distribution="softmax")
    with pytest.raises(ConfigError, match=r"\(2, 4, 1\)"):
        soft_sort(x.unsqueeze(-1), 10.0)
    with pytest.raises(ConfigError, match="steepness"):
        soft_sort(x, 0.0)
