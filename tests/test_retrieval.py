"""k-NN backends against a brute-force float64 top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densebench import precision, retrieval
from densebench.errors import ConfigError
from densebench.retrieval import BACKENDS, StackedRows, block_topk, build_index, merge_topk

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
    assert (auto["backend"], auto["requested_backend"], auto["dtype"]) == ("torch", "auto", "float32")
    assert "in place" in auto["auto_choice"] and f["auto_choice"] == "requested"


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


# ---------------------------------------------------------------------------------------------------
# The canonical top-k (ties by index), the bank read in place, the backend auto picks

def _lex_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Brute force: each row's columns by decreasing score, equal scores by increasing column."""
    cols = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((cols, -scores), axis=-1)[:, :k]


def test_block_topk_and_merge_resolve_ties_by_lowest_index():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 50), generator=g).float()       # ties everywhere, also at the k-th place
    for k in (1, 5, 30, 50, 80):
        s, i = merge_topk(*block_topk(scores, k), k)
        want = _lex_topk(scores.numpy(), k)
        assert np.array_equal(i.numpy(), want)
        assert np.array_equal(s.numpy(), np.take_along_axis(scores.numpy(), want, 1))
    # blocks merged in any order, and padded candidates (-inf, -1), give the same lists
    parts = [block_topk(scores[:, a:b], 7) for a, b in ((30, 50), (0, 13), (13, 30))]
    sims = torch.cat([p[0] for p in parts] + [torch.full((64, 3), -float("inf"))], 1)
    idx = torch.cat([parts[0][1] + 30, parts[1][1], parts[2][1] + 13, torch.full((64, 3), -1)], 1)
    assert np.array_equal(merge_topk(sims, idx, 7)[1].numpy(), _lex_topk(scores.numpy(), 7))


def test_stacked_rows_read_blocks_gather_and_shard_without_concatenating(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((23, 4)).astype(np.float16)
    parts = []
    for j, (a, b) in enumerate(((0, 10), (10, 11), (11, 23))):
        mm = np.lib.format.open_memmap(tmp_path / f"p{j}.npy", mode="w+", dtype=np.float16, shape=(b - a, 4))
        mm[:] = whole[a:b]
        mm.flush()
        parts.append(np.load(tmp_path / f"p{j}.npy", mmap_mode="r"))
    rows = StackedRows(parts)
    assert rows.shape == (23, 4) and rows.dtype == torch.float16 and rows.nbytes == whole.nbytes
    assert np.array_equal(rows.block(8, 15).numpy(), whole[8:15])
    assert rows.block(8, 15, torch.float32).dtype == torch.float32
    idx = torch.tensor([[22, 0, 10], [11, 9, 10]])
    assert np.array_equal(rows[idx].numpy(), whole[idx.numpy()])
    shard = rows.shard(9, 20)
    assert len(shard) == 11 and np.array_equal(shard.block(0, 11).numpy(), whole[9:20])
    assert np.array_equal(shard[torch.tensor([0, 10])].numpy(), whole[[9, 19]])
    assert np.array_equal(shard.to("cpu", torch.float32).numpy(), whole[9:20].astype(np.float32))


def test_memory_mapped_float16_bank_is_searched_in_place_and_exactly(tmp_path):
    keys, queries = _data(n=3000, m=40, d=32, seed=7)
    keys = keys.astype(np.float16)
    keys[100:130] = keys[5]                                             # 31 tied keys for queries near key 5
    queries[:3] = keys[5]
    np.save(tmp_path / "a.npy", keys[:1700])
    np.save(tmp_path / "b.npy", keys[1700:])
    rows = StackedRows([np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")])
    index = build_index(rows, "torch", query_chunk=16, key_chunk=500)
    d = index.describe()
    assert index.keys is None and d["storage"] == "in place, float16 blocks converted" and d["dtype"] == "float32"
    sims, idx = index.search(queries, 20)
    full = _assert_exact_topk(keys.astype(np.float32), queries, sims, idx, k=20)
    assert idx[:3].tolist() == [[5] + list(range(100, 119))] * 3        # ties: the lowest indices, in order
    clear = np.abs(np.diff(-np.sort(-full, axis=1)[:, 19:21], axis=1))[:, 0] > 1e-4
    assert np.array_equal(idx.numpy()[clear], _lex_topk(full, 20)[clear])
    # one block of any size, or all the keys in memory: the same lists bit for bit
    for kw in ({"query_chunk": 40, "key_chunk": 3000}, {"query_chunk": 17, "key_chunk": 7}):
        again = build_index(torch.from_numpy(keys.astype(np.float32)), "torch", **kw).search(queries, 20)
        assert torch.equal(again[1], idx) and torch.equal(again[0], sims)


class _FakeGpuFaiss:
    """The faiss-gpu calls FaissIndex makes, recorded (no GPU needed)."""

    __version__ = "fake-gpu"

    def __init__(self):
        self.added: list[int] = []
        self.configs: list = []

    def omp_set_num_threads(self, n):
        pass

    def get_num_gpus(self):
        return 1

    def StandardGpuResources(self):  # noqa: N802 (faiss' name)
        return object()

    def GpuIndexFlatConfig(self):  # noqa: N802
        return type("Cfg", (), {"device": None, "useFloat16": None})()

    def GpuIndexFlatIP(self, res, d, cfg):  # noqa: N802
        self.configs.append(cfg)
        fake = self

        class Index:
            def add(self, x):
                assert x.dtype == np.float32 and x.shape[1] == d
                fake.added.append(x.shape[0])
        return Index()


def test_auto_on_cuda_keeps_fp16_keys_even_with_faiss_gpu(monkeypatch):
    """With faiss-gpu installed, auto used to build an fp32 GpuIndexFlatIP; now the torch backend with fp16 keys,
    and an explicit --backend faiss stores fp16 too (unless --precision fp32). Mocked: no GPU here."""
    fake = _FakeGpuFaiss()
    monkeypatch.setattr(retrieval, "_import_faiss", lambda: fake)
    monkeypatch.setattr(retrieval, "resolve_device", lambda device: "cuda")
    assert retrieval.faiss_gpu_available()
    built = {}

    class RecordingTorchIndex(retrieval.Index):
        backend = "torch"

        def __init__(self, keys, device, fp16, query_chunk=None, key_chunk=None):
            super().__init__(len(keys), keys.shape[1], device)
            built.update(device=device.type, fp16=fp16)

        def _search(self, queries, k):
            raise AssertionError("not searched")

    monkeypatch.setattr(retrieval, "TorchIndex", RecordingTorchIndex)
    keys, _ = _data(n=300, d=8)
    auto = build_index(keys, "auto", "cuda")
    assert built == {"device": "cuda", "fp16": True}
    assert (auto.backend, auto.requested_backend) == ("torch", "auto") and "float16" in auto.describe()["auto_choice"]
    with precision.precision("fp32"):
        build_index(keys, "auto", "cuda")
    assert built["fp16"] is False

    monkeypatch.setattr(retrieval, "STREAM_BYTES", 4 * 8 * 100)          # 100 rows per added block
    index = build_index(keys, "faiss", "cuda")
    d = index.describe()
    assert (d["backend"], d["dtype"], d["gpu"]) == ("faiss", "float16", True) and fake.configs[-1].useFloat16 is True
    assert fake.added == [100, 100, 100]
    with precision.precision("fp32"):
        assert build_index(keys, "faiss", "cuda").describe()["dtype"] == "float32"
    assert fake.configs[-1].useFloat16 is False
