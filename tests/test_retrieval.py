"""k-NN backends against a brute-force float64 top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densebench.errors import ConfigError
from densebench.retrieval import BACKENDS, build_index

EXACT = [("torch", {}), ("torch", {"query_chunk": 7, "key_chunk": 97}), ("torch", {"key_chunk": 1}),
         ("faiss", {})]


def _data(n=1000, m=53, d=24, seed=0, normalise=True):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((m, d)).astype(np.float32)
    if normalise:
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    return keys, queries


def _assert_exact_topk(keys, queries, sims, idx, k, tol=1e-5):
    """Equal to the float64 brute force up to ties: same similarities, and every returned index
    really has the returned similarity (so swapped tied indices are accepted)."""
    full = queries.astype(np.float64) @ keys.astype(np.float64).T
    expected = -np.sort(-full, axis=1)[:, :k]
    sims, idx = sims.cpu().numpy(), idx.cpu().numpy()
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    assert sims.shape == idx.shape == (queries.shape[0], k)
    np.testing.assert_allclose(sims, expected, atol=tol)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), expected, atol=tol)
    assert np.all(np.diff(sims, axis=1) <= 0)                                   # best first
    assert all(len(set(row)) == k for row in idx.tolist())                      # no duplicates
    return full


@pytest.mark.parametrize("backend,kw", EXACT)
@pytest.mark.parametrize("k", [1, 5, 30])
def test_exact_backends_equal_float64_brute_force(backend, kw, k):
    keys, queries = _data()
    index = build_index(keys, backend, **kw)
    sims, idx = index.search(queries, k)
    full = _assert_exact_topk(keys, queries, sims, idx, k)
    # random data has no near-ties here, so the indices are exactly the brute-force ones
    gaps = -np.diff(-np.sort(-full, axis=1)[:, : k + 1], axis=1)
    if gaps.min() > 1e-4:
        np.testing.assert_array_equal(idx.numpy(), np.argsort(-full, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("backend,kw", EXACT)
def test_torch_tensor_inputs_and_chunk_boundaries(backend, kw):
    # N and M are not multiples of any chunk size; torch inputs give the same answer as numpy
    keys, queries = _data(n=517, m=19, d=8, seed=3)
    a = build_index(torch.from_numpy(keys), backend, **kw).search(torch.from_numpy(queries), 10)
    b = build_index(keys, backend, **kw).search(queries, 10)
    _assert_exact_topk(keys, queries, *a, k=10)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("backend,kw", EXACT)
def test_ties_return_tied_keys(backend, kw):
    # keys 0..4 are copies of one vector: the top-5 of a query equal to it are exactly those keys
    keys, _ = _data(n=200, d=8, seed=4)
    keys[1:5] = keys[0]
    sims, idx = build_index(keys, backend, **kw).search(keys[:1], 5)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sims[0].numpy(), np.full(5, 1.0), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss", "faiss-ivf"])
def test_k_larger_than_bank_is_clamped_with_a_note(backend):
    keys, queries = _data(n=6, m=4, d=8)
    kw = {"nlist": 2, "nprobe": 2} if backend == "faiss-ivf" else {}
    index = build_index(keys, backend, **kw)
    with pytest.warns(UserWarning, match="clamped to 6"):
        sims, idx = index.search(queries, 30)
    _assert_exact_topk(keys, queries, sims, idx, k=6)
    assert any("clamped" in n for n in index.describe()["notes"])


def test_ivf_with_all_lists_probed_is_exact():
    keys, queries = _data(n=2000, m=40, d=16, seed=5)
    index = build_index(keys, "faiss-ivf", nlist=16, nprobe=16)
    sims, idx = index.search(queries, 10)
    _assert_exact_topk(keys, queries, sims, idx, k=10)
    d = index.describe()
    assert (d["backend"], d["exact"], d["nlist"], d["nprobe"]) == ("faiss-ivf", True, 16, 16)


def test_ivf_default_is_approximate_and_labelled():
    keys, queries = _data(n=4000, m=40, d=16, seed=6)
    index = build_index(keys, "faiss-ivf")
    d = index.describe()
    assert d["exact"] is False and 1 <= d["nprobe"] < d["nlist"] <= 4000 // 39
    sims, idx = index.search(queries, 5)
    # approximate, but each returned similarity is the true inner product of the returned key
    full = queries.astype(np.float64) @ keys.astype(np.float64).T
    hit = idx.numpy() >= 0
    true_sims = np.take_along_axis(full, np.maximum(idx.numpy(), 0), 1)
    np.testing.assert_allclose(sims.numpy()[hit], true_sims[hit], atol=1e-5)


def test_describe_records_backend_dtype_and_device():
    keys, _ = _data(n=50, d=8)
    t = build_index(keys, "torch").describe()
    assert (t["backend"], t["exact"], t["device"], t["dtype"], t["num_keys"], t["dim"]) == \
        ("torch", True, "cpu", "float32", 50, 8)
    f = build_index(keys, "faiss").describe()
    assert (f["backend"], f["exact"], f["dtype"], f["gpu"]) == ("faiss", True, "float32", False)
    assert f["threads"] == torch.get_num_threads()
    auto = build_index(keys, "auto").describe()
    assert (auto["backend"], auto["requested_backend"]) == ("faiss", "auto")


def test_empty_query_batch():
    keys, _ = _data(n=20, d=4)
    for backend in ("torch", "faiss"):
        sims, idx = build_index(keys, backend).search(np.zeros((0, 4), np.float32), 3)
        assert sims.shape == idx.shape == (0, 3)


def test_bad_inputs_raise_config_errors():
    keys, queries = _data(n=20, d=4)
    with pytest.raises(ConfigError, match="accepted: " + ", ".join(sorted(BACKENDS))):
        build_index(keys, "scann")
    with pytest.raises(ConfigError, match="empty"):
        build_index(np.zeros((0, 4), np.float32), "torch")
    with pytest.raises(ConfigError, match="empty"):
        build_index(np.zeros((0, 4), np.float32), "faiss")
    with pytest.raises(ConfigError, match="4-dimensional"):
        build_index(keys, "torch").search(np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ConfigError, match="positive"):
        build_index(keys, "faiss").search(queries[:, :4], 0)
    with pytest.raises(ConfigError, match="nprobe"):
        build_index(keys, "faiss-ivf", nlist=4, nprobe=5)
    with pytest.raises(ConfigError, match="nlist"):
        build_index(keys, "faiss-ivf", nlist=21)
    with pytest.raises(ConfigError, match="faiss-ivf"):
        build_index(keys, "torch", nlist=4)
    with pytest.raises(ConfigError, match="fp16"):
        build_index(keys, "torch", fp16=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            build_index(keys, "torch", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_fp16_close_to_brute_force():
    keys, queries = _data(n=3000, m=64, d=32)
    index = build_index(keys, "auto", device="cuda")
    sims, _ = index.search(torch.from_numpy(queries).cuda(), 10)
    full = queries.astype(np.float64) @ keys.astype(np.float64).T
    expected = -np.sort(-full, axis=1)[:, :10]
    np.testing.assert_allclose(sims.cpu().numpy(), expected, atol=2e-2)
