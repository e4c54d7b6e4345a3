"""The in-context protocol at published sizes: search blocks sized on their own (and never changing a number),
the memory bank searched where it lies, and the scoring sharded across processes (bank or queries) with metrics
equal to one process's: against a float64 brute force, a spawned 2-rank gloo group, and ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densebench.api import evaluate
from densebench.distributed import Group
from densebench.encoders import load_encoder
from densebench.errors import ConfigError
from densebench.metrics import segmentation_scores
from densebench.protocols import incontext
from densebench.protocols.incontext import BankSearch, Config, SearchPlan, choose_sharding, search_plan
from densebench.retrieval import StackedRows

SMALL = {"input_size": 128, "augment_epochs": 1}


# ---------------------------------------------------------------------------------------------------
# Search blocks: sized by memory, independent of the label-transfer chunk, never changing a number

def test_search_blocks_are_sized_apart_from_the_label_transfer_chunk():
    # ADE20K at 504 px with a /14 model: 151 classes x 504^2 upsampled scores leave one image per transfer
    # chunk, while the search still takes whole blocks of 2^26 / 65536 = 1024 queries, at least 32 of them a call
    ade = search_plan(Config(dataset="ade20k", input_size=504), "cuda", 10_240_000, 36 * 36, 151)
    assert ade.transfer_chunk == int(64e6 // (151 * 504 * 504)) == 1
    assert (ade.bank_block, ade.search_block) == (65536, 1024)
    assert ade.images_per_call == -(-32 * 1024 // (36 * 36)) == 26
    cpu = search_plan(Config(input_size=448, search_block=300, query_chunk=2), "cpu", 5000, 28 * 28, 21)
    assert (cpu.bank_block, cpu.search_block, cpu.transfer_chunk) == (5000, 300, 2)
    assert cpu.images_per_call == -(-32 * 300 // (28 * 28))
    assert search_plan(Config(input_size=448, query_chunk=50), "cpu", 5000, 28 * 28, 21).images_per_call == 50
    assert (cpu.bank_rows(5000, 0, 2), cpu.bank_rows(5000, 1, 2)) == ((0, 5000), (5000, 5000))


def _spy_features(monkeypatch) -> dict:
    seen = {}
    real = incontext.score

    def spy(ctx, prep, feats):
        seen.update(feats=feats, prep=prep, config=ctx.config, patch=ctx.encoder.patch_size)
        return real(ctx, prep, feats)

    monkeypatch.setattr(incontext, "score", spy)
    return seen


def _float64_reference(seen: dict) -> float:
    """The recipe by brute force in float64: every similarity, the k best (ties: lower bank index), softmax
    label transfer, bilinear upsampling, argmax, confusion counts, Hungarian mIoU."""
    f, prep, cfg, p = seen["feats"], seen["prep"], seen["config"], seen["patch"]
    keys = np.concatenate([np.asarray(k, dtype=np.float64) for k in f["keys"]])
    labels = np.concatenate([np.asarray(lab, dtype=np.float64) for lab in f["labels"]])
    val = np.asarray(f["val"]["features"], dtype=np.float64)
    n, s, C = val.shape[0], val.shape[1], labels.shape[1]
    q = val.reshape(-1, val.shape[-1])
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ keys.T
    k = min(cfg.neighbours, len(keys))
    top = np.lexsort((np.broadcast_to(np.arange(len(keys)), sims.shape), -sims), axis=-1)[:, :k]
    logits = np.take_along_axis(sims, top, 1) / cfg.temperature
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    scores = torch.from_numpy(np.einsum("qk,qkc->qc", w, labels[top] / (p * p))).view(n, s, s, C).permute(0, 3, 1, 2)
    pred = F.interpolate(scores, size=(cfg.input_size,) * 2, mode="bilinear", align_corners=False).argmax(1).numpy()
    masks = np.asarray(f["val"]["masks"]).astype(np.int64)
    keep = masks != prep.val.ignore_index
    conf = np.bincount(masks[keep] * C + pred[keep], minlength=C * C).reshape(C, C)
    return segmentation_scores(conf, matching="hungarian", class_names=prep.val.class_names)["miou"]


@pytest.mark.parametrize("model", ["pixels", "random:vit_small_patch16_224"])
def test_block_sizes_never_change_the_metrics_and_match_a_float64_brute_force(model, synth_root, tmp_path,
                                                                               monkeypatch):
    """pixels has many exactly tied neighbours (flat regions): the tie order is part of the recipe."""
    seen = _spy_features(monkeypatch)
    enc = load_encoder(model)
    runs = [evaluate(enc, benchmarks=["voc-incontext"], data_root=synth_root, cache_dir=tmp_path, progress=False,
                     **SMALL, **blocks)[0]
            for blocks in ({}, {"search_block": 16, "query_chunk": 1}, {"search_block": 1000, "query_chunk": 7})]
    assert runs[1]["derived"]["retrieval"]["blocks"]["search_block"] == 16
    assert runs[2]["derived"]["retrieval"]["blocks"]["transfer_chunk"] == 7
    assert runs[0]["metrics"] == runs[1]["metrics"] == runs[2]["metrics"]
    assert runs[0]["metrics"]["miou"] == _float64_reference(seen)


# ---------------------------------------------------------------------------------------------------
# Sharding: the choice, and the bank-sharded search merged exactly

class _TwoRanks:
    rank, world, enabled = 0, 2, True

    def __init__(self, other_budget: int):
        self.other_budget = other_budget

    def gather(self, obj, stage):
        return [obj, self.other_budget]


def test_sharding_is_chosen_by_the_tightest_rank_memory(monkeypatch):
    monkeypatch.setattr(incontext, "bank_budget", lambda device: 1000)
    cpu = torch.device("cpu")
    fits = choose_sharding(Config(), _TwoRanks(600), cpu, 599)
    assert (fits["mode"], fits["budget_bytes"], fits["bank_bytes"]) == ("queries", 600, 599)
    assert choose_sharding(Config(), _TwoRanks(600), cpu, 601)["mode"] == "bank"
    assert choose_sharding(Config(), _TwoRanks(2000), cpu, 1001)["mode"] == "bank"
    assert choose_sharding(Config(backend="faiss"), _TwoRanks(1), cpu, 10**9)["mode"] == "queries"
    assert choose_sharding(Config(sharding="bank"), _TwoRanks(10**9), cpu, 1) == {"mode": "bank",
                                                                                   "reason": "--sharding"}
    with pytest.raises(ConfigError, match="--sharding bank"):
        Config(sharding="bank", backend="faiss-ivf")


class _NoFailures:
    def check(self, keys):
        return False


def _bank(n=230, d=24, seed=0):
    """Two float16 parts (two epochs), many exactly repeated keys (ties across shard boundaries), rows not of unit
    norm (hbird-1.1 keys); queries equal to some keys."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float16)
    keys *= rng.uniform(0.5, 2.0, (n, 1)).astype(np.float16)
    keys[::7] = keys[3]                 # exact repeats (scaled first): equal similarities for every query
    keys[200:] = keys[10]
    queries = F.normalize(torch.cat([torch.from_numpy(keys[:40].astype(np.float32)),
                                     torch.randn(56, d, generator=torch.Generator().manual_seed(seed))]), dim=1)
    labels = rng.integers(0, 17, (n, 5)).astype(np.uint8)
    return [keys[:120], keys[120:]], [labels[:120], labels[120:]], queries


PLAN = SearchPlan(bank_block=50, search_block=32, images_per_call=1, transfer_chunk=1)


def _search(keys, labels, queries, k, group, mode, plan=PLAN):
    config = Config(neighbours=k, key_norm="patch-axis", backend="torch")
    search = BankSearch(config, StackedRows(keys), StackedRows(labels), plan, torch.device("cpu"), group, mode)
    return search(queries)


def _bank_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        group = Group(rank=rank, world=world, backend="gloo", store=_NoFailures())
        keys, labels, queries = _bank()
        found = {k: _search(keys, labels, queries, k, group, "bank") for k in (30, 100)}
        torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bank_sharded_search_merges_to_the_single_process_lists(tmp_path):
    """2 gloo ranks: rank 0 holds bank blocks 0-2 (150 keys), rank 1 blocks 3-4 (80 keys, fewer than k=100);
    tied keys straddle the shards; hbird-1.1 key norms. Every rank gets the single search's lists, bit for bit."""
    import torch.multiprocessing as mp

    mp.spawn(_bank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    keys, labels, queries = _bank()
    single = Group()
    for k in (30, 100):
        # the reference searches other blocks (7 keys) than the shards (50): ties must be settled the same way
        weights, idx = _search(keys, labels, queries, k, single, None,
                               SearchPlan(bank_block=7, search_block=32, images_per_call=1, transfer_chunk=1))
        bank = np.concatenate(keys).astype(np.float64)
        sims = queries.double().numpy() @ bank.T
        gap = np.sort(sims, axis=1)[:, ::-1]
        clear = np.abs(gap[:, k - 1] - gap[:, k]) > 1e-3     # no near-tie at the k-th place: exact index sets
        brute = np.lexsort((np.broadcast_to(np.arange(len(bank)), sims.shape), -sims), axis=-1)[:, :k]
        assert clear.sum() > 20
        assert np.array_equal(np.sort(idx.numpy()[clear], 1), np.sort(brute[clear], 1))
        cosines = np.take_along_axis(sims, idx.numpy(), 1) / np.linalg.norm(bank, axis=1)[idx.numpy()]
        np.testing.assert_allclose(weights.numpy(), cosines, atol=1e-5)
        for rank in range(2):
            w_r, i_r = torch.load(tmp_path / f"rank{rank}.pt")[k]
            assert torch.equal(i_r, idx) and torch.equal(w_r, weights)


# ---------------------------------------------------------------------------------------------------
# torchrun: 2 gloo processes on the CPU give the 1-process metrics, sharded either way

def _torchrun(synth_root, cache, out, *extra) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "densebench",
           "run", "-m", "random:vit_small_patch16_224", "--input-size", "224", "-b", "voc-incontext", "--data-root",
           str(synth_root), "--device", "cpu", "--cache-dir", str(cache), "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_torchrun_two_processes_equal_one_for_both_shardings(synth_root, tmp_path):
    cache = tmp_path / "cache"
    one = evaluate("random:vit_small_patch16_224", benchmarks=["voc-incontext"], data_root=synth_root,
                   cache_dir=cache, progress=False, input_size=224, save_predictions=str(tmp_path / "one"),
                   save_predictions_count=3)[0]
    assert one["derived"]["memory_rows"] > one["derived"]["retrieval"]["blocks"]["bank_block"]   # 2 bank blocks
    auto = _torchrun(synth_root, cache, tmp_path / "auto.json")
    bank = _torchrun(synth_root, cache, tmp_path / "bank.json", "--sharding", "bank", "--search-block", "64",
                     "--query-chunk", "5", "--save-predictions", str(tmp_path / "two"), "--save-predictions-count", "3")
    assert auto["metrics"] == bank["metrics"] == one["metrics"]
    assert auto["derived"]["sharding"] == auto["derived"]["distributed"]["scoring"] == "queries"
    assert "fits in" in auto["derived"]["retrieval"]["sharding"]["reason"]
    assert bank["derived"]["sharding"] == bank["derived"]["distributed"]["scoring"] == "bank"
    assert bank["derived"]["retrieval"]["num_keys"] == one["derived"]["memory_rows"]
    assert auto["provenance"]["cache"]["images_forwarded"] == bank["provenance"]["cache"]["images_forwarded"] == 0
    pictures = [sorted((tmp_path / d).iterdir()) for d in ("one", "two")]
    assert [p.name for p in pictures[0]] == [p.name for p in pictures[1]] and len(pictures[0]) == 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*pictures))
