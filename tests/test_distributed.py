"""`densebench run` on several processes (torchrun, srun) on the CPU with gloo: the same numbers as one
process, the views forwarded once between the ranks, one result written, and a failure on one rank
stopping every rank with a message naming it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from densebench import distributed
from densebench.cache import CacheWriter, FeatureCache

MODEL = "random:vit_small_patch16_224"
# the embedded default's reduced settings of these benchmarks (each option applies where it is defined)
BENCHES = "voc-incontext,voc-overcluster,spair-correspondence,davis-propagation"
OPTIONS = ["--input-size", "224", "--clusters", "gt,500", "--seeds", "2", "--kmeans-iters", "20",
           "--kmeans-restarts", "1", "--short-side", "128"]


# -- pieces ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_item_once_in_order_and_evenly(world):
    for n in (0, 1, 7, 8, 9, 100, 10582):
        spans = [distributed.shard_range(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1


def test_srun_variables_become_torchrun_ones():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    got = distributed.slurm_environment(env)
    assert got == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(20000 + 4242), "LOCAL_WORLD_SIZE": "4"}
    assert distributed.slurm_environment({**env, "WORLD_SIZE": "8"}) is None   # torchrun inside srun wins
    assert distributed.slurm_environment({**env, "SLURM_NTASKS": "1"}) is None


def test_a_single_process_group_does_nothing():
    g = distributed.current()
    assert not g.enabled and g.is_main and g.shard(10) == (0, 10)
    assert g.gather("x", "stage") == ["x"] and g.share(5, "stage") == 5
    g.sync("stage")
    g.check_abort()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_pair(stall_s: float = 1.0):
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    g0 = distributed.Group(rank=0, world=2, store=dist.PrefixStore("t", master), stall_s=stall_s)
    g1 = distributed.Group(rank=1, world=2, store=dist.PrefixStore("t", client), stall_s=stall_s)
    return g0, g1, (master, client)


def test_a_failed_rank_stops_the_others_naming_it():
    g0, g1, _keep = _store_pair(stall_s=30)
    g1.fail(ValueError("disk on fire"), "voc-incontext: extracting features")
    with pytest.raises(distributed.DistributedError, match=r"rank 1 of 2 failed during voc-incontext: extracting "
                                                           r"features: ValueError: disk on fire"):
        g0.sync("the next stage")
    with pytest.raises(distributed.DistributedError, match="rank 1"):
        g0.check_abort()


def test_a_silent_rank_is_named_after_the_stall_limit():
    g0, _g1, _keep = _store_pair(stall_s=0.5)
    with pytest.raises(distributed.DistributedError, match=r"rank 1 of 2 has not responded for \d+ s while the "
                                                           r"others wait at scoring"):
        g0.sync("scoring")


def test_ranks_exchange_objects_in_rank_order():
    import threading

    g0, g1, _keep = _store_pair(stall_s=30)
    got = {}
    t = threading.Thread(target=lambda: got.__setitem__(1, (g1.gather("b", "s"), g1.share(None, "t"))))
    t.start()
    got[0] = (g0.gather("a", "s"), g0.share({"k": 1}, "t"))
    t.join(10)
    assert got[0] == got[1] == (["a", "b"], {"k": 1})


def _write_entry(cache: FeatureCache, key: str, feats: np.ndarray, rows: list[np.ndarray]) -> dict:
    w = CacheWriter(cache, key, {"k": key}, {"n_views": len(feats)})
    for i in range(len(feats)):
        w.append("features", feats[i:i + 1])
        w.append("keys", rows[i])
        w.end_batch(1)
        if i % 2:
            w._close_shard()
    return w.commit()


def test_parts_assemble_into_the_entry_one_process_writes(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((7, 3, 3, 5)).astype(np.float16)
    rows = [rng.standard_normal((int(rng.integers(0, 4)), 6)).astype(np.float16) for _ in range(7)]
    one = FeatureCache(tmp_path / "one", shard_bytes=0, shard_seconds=None)
    ref = _write_entry(one, "a" * 64, feats, rows)
    many = FeatureCache(tmp_path / "many", shard_bytes=0, shard_seconds=None)
    spans = [distributed.shard_range(7, r, 3) for r in range(3)]
    part_keys = [f"{r}" * 64 for r in range(1, 4)]
    for key, (lo, hi) in zip(part_keys, spans):
        _write_entry(many, key, feats[lo:hi], rows[lo:hi])
    out = many.assemble("f" * 64, {"k": "whole"}, {"n_views": 7}, part_keys)
    for name in ("features", "keys"):
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(ref[name]))
    assert many.verify_entry("f" * 64) is None                   # every carried-over block checks out
    assert not any(many._dir(k).exists() for k in part_keys)      # the parts are gone
    meta = json.loads((many._dir("f" * 64) / "meta.json").read_text())
    assert meta["info"]["n_images"] == 7 and meta["assembled_from"] == 3
    # a damaged byte in the assembled file is caught by the carried-over checksums
    path = many._dir("f" * 64) / "features.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in (FeatureCache(tmp_path / "many").verify_entry("f" * 64) or "")


def test_a_missing_part_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, shard_bytes=0, shard_seconds=None)
    _write_entry(cache, "1" * 64, np.zeros((2, 1, 1, 2), np.float16), [np.zeros((1, 2), np.float16)] * 2)
    from densebench.cache import CacheError

    with pytest.raises(CacheError, match="missing or damaged"):
        cache.assemble("f" * 64, {}, {}, ["1" * 64, "2" * 64])


# -- whole runs ----------------------------------------------------------------------------------------------
def _env(**more) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                    "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "DENSEBENCH_DIST_STALL": "60", **more}


def _run_args(suite: Path, cache: Path, out: Path, benches: str = BENCHES, extra=()) -> list[str]:
    options = OPTIONS if benches == BENCHES else ["--input-size", "224"]
    return ["run", "-m", MODEL, "-b", benches, "--data-root", str(suite), "--device", "cpu", "--cache-dir",
            str(cache), "-o", str(out), "--quiet", *options, *extra]


def _scores(folder: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "summary.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_root):
    """The same benchmarks once in one process and once under torchrun with 2 processes."""
    base = tmp_path_factory.mktemp("dist")
    one = subprocess.run([sys.executable, "-m", "densebench", *_run_args(synth_root, base / "c1", base / "one")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "densebench", *_run_args(synth_root, base / "c2", base / "two")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return base, one, two


def test_two_processes_give_the_numbers_of_one(runs):
    base, _, two = runs
    one, many = _scores(base / "one"), _scores(base / "two")
    assert set(one) == set(many) == set(BENCHES.split(","))
    for name in one:
        assert many[name]["metrics"] == one[name]["metrics"], name
        # automatic --num-workers divides the cores among the ranks (it never changes the numbers)
        strip = (lambda c: {k: v for k, v in c.items() if k != "num_workers"})
        assert strip(many[name]["config"]) == strip(one[name]["config"]), name
    # rank 0 printed the table once and wrote one summary
    assert two.stdout.count("densebench results") == 1
    assert json.loads((base / "two" / "summary.json").read_text())["results"]


def test_the_ranks_share_the_forwards(runs):
    base, _, _ = runs
    one, many = _scores(base / "one"), _scores(base / "two")
    for name in one:
        d = many[name]["derived"]["distributed"]
        assert d["world_size"] == 2 and d["backend"] == "gloo"
        shares = d["images_forwarded_per_rank"]
        total = one[name]["provenance"]["cache"]["images_forwarded"]
        assert sum(shares) == many[name]["provenance"]["cache"]["images_forwarded"] == total, name
        assert min(shares) > 0 or total == 0, (name, shares)
    # nothing of the ranks' part entries is left in the cache: each entry is one whole entry
    metas = [json.loads(p.read_text()) for p in (base / "c2").rglob("meta.json")]
    assert metas and not any("part" in (m.get("key_parts") or {}) for m in metas)
    assert any(m.get("assembled_from") == 2 for m in metas)
    # the entries a result names are the whole entries, as one process names them
    for name in one:
        assert many[name]["provenance"]["cache"]["entries"] == one[name]["provenance"]["cache"]["entries"], name


def _srun(suite: Path, cache: Path, out: Path, roots: list[Path], extra=()) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = []
    for rank, root in enumerate(roots):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="1",
                   SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DENSEBENCH_DIST_STALL="30")
        procs.append(subprocess.Popen([sys.executable, "-m", "densebench",
                                       *_run_args(root, cache, out, "voc-incontext", extra)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_srun_tasks_run_as_ranks(runs, synth_root, tmp_path):
    base, _, _ = runs
    done = _srun(synth_root, tmp_path / "c", tmp_path / "out", [synth_root, synth_root])
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    got = _scores(tmp_path / "out")["voc-incontext"]
    assert got["metrics"] == _scores(base / "one")["voc-incontext"]["metrics"]
    assert got["derived"]["distributed"]["world_size"] == 2


@pytest.mark.parametrize("bad", [1, 0])   # under srun rank 0 hosts the rendezvous store: its failure too
def test_a_failure_on_one_rank_ends_every_rank_with_its_message(synth_root, tmp_path, bad):
    roots = [synth_root, synth_root]
    roots[bad] = tmp_path / "nowhere"
    done = _srun(synth_root, tmp_path / "c", tmp_path / "out", roots)
    assert [p.returncode for p in done] == [2, 2]
    assert all("Traceback" not in p.stderr for p in done)
    assert "nowhere" in done[bad].stderr                                 # the failing rank says why
    other = done[1 - bad].stderr
    assert f"rank {bad} of 2 failed" in other and "nowhere" in other     # the other names it
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.json"))


def test_no_cache_is_refused_on_every_rank(synth_root, tmp_path):
    done = _srun(synth_root, tmp_path / "c", tmp_path / "out", [synth_root, synth_root], extra=["--no-cache"])
    assert [p.returncode for p in done] == [2, 2]
    assert all("--no-cache" in p.stderr for p in done)
