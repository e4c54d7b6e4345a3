"""`densebench selfcheck` on the CPU (--quick): the smoke test that keeps the GPU self-check from rotting.

The report's structure, every check PASS or SKIP with a reason, its figures against independent
computations, a deliberately broken retrieval backend reported FAIL with exit 1, and a report that is never
written over an existing file."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from densebench import retrieval, selfcheck
from densebench.benchmark_table import benchmarks, get_benchmark
from densebench.cli import app, main
from densebench.results import read_result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU self-check through the CLI, its working files kept."""
    root = tmp_path_factory.mktemp("selfcheck")
    out, keep = root / "report.json", root / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSEBENCH_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, ["selfcheck", "--device", "cpu", "--quick", "--out", str(out),
                                          "--keep", str(keep)])
    return result, json.loads(out.read_text()), keep


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_quick_cpu_run_passes_every_check_or_skips_with_a_reason(quick_run):
    result, report, _ = quick_run
    assert result.exit_code == 0, result.output
    assert report["schema"] == selfcheck.SCHEMA and report["device"] == "cpu" and report["quick"] is True
    assert report["ok"] is True and report["groups"] == list(selfcheck.GROUPS)
    for c in report["checks"]:
        assert set(c) == {"name", "group", "status", "figure", "reason", "seconds", "details"}
        assert c["status"] in ("PASS", "SKIP"), (c["name"], c["reason"])
        assert c["status"] == "PASS" or c["reason"], c["name"]
        assert c["group"] in selfcheck.GROUPS
    checks = by_name(report)
    protocols = list(dict.fromkeys(b.protocol_name for b in benchmarks()))
    first_of = {p: next(b.name for b in benchmarks() if b.protocol_name == p) for p in protocols}
    expected = {"environment", *(f"benchmark {n}" for n in first_of.values()), "retrieval torch", "retrieval faiss",
                "retrieval faiss-ivf", "kmeans cpu", "kmeans gpu vs cpu", "neco_train train", "neco_train resume",
                "neco_train compile", "distributed"}
    assert set(checks) == expected
    assert report["counts"] == {"PASS": len(expected) - 2, "FAIL": 0, "SKIP": 2}
    skipped = {n for n, c in checks.items() if c["status"] == "SKIP"}
    assert skipped == {"kmeans gpu vs cpu", "neco_train compile"}
    # the 2-process torchrun (gloo) gives the 1-process number, and its ranks share the forwards
    dist_details = checks["distributed"]["details"]
    assert dist_details["difference_points"] == 0.0
    assert len(dist_details["forwards_per_rank"]) == 2 and min(dist_details["forwards_per_rank"]) > 0
    # the compact table: one row per check with its status
    for name in expected:
        assert name.split()[0] in result.output
    assert "report written to" in result.output


def test_environment_names_the_versions(quick_run):
    _, report, _ = quick_run
    env = by_name(report)["environment"]["details"]
    assert env["versions"]["torch"] == torch.__version__ and env["cuda_available"] is torch.cuda.is_available()
    assert env["versions"]["faiss"] and env["faiss_gpu_build"] in (True, False)
    assert report["environment"] == env


def test_benchmark_figures_are_the_results_written(quick_run):
    _, report, keep = quick_run
    for c in report["checks"]:
        if c["group"] != "benchmarks":
            continue
        bench = c["details"]["benchmark"]
        written = read_result(keep / "results-cpu" / f"{bench}.json")
        assert written.provenance["device"] == "cpu"
        assert c["details"]["passes"]["cpu"]["value"] == written.main_score
        assert c["details"]["comparison"]["status"] == "SKIP"
        assert c["details"]["tolerance_points"] == selfcheck.TOLERANCE_POINTS[get_benchmark(bench).protocol_name]
    assert selfcheck.tolerance_points(get_benchmark("coco-stuff-linear")) == 6.0


def test_retrieval_and_kmeans_figures_match_independent_computations(quick_run):
    _, report, _ = quick_run
    checks = by_name(report)
    n, d, m, k = selfcheck.QUICK.retrieval
    for backend in ("torch", "faiss", "faiss-ivf"):
        det = checks[f"retrieval {backend}"]["details"]
        assert (det["keys"], det["dim"], det["queries"], det["k"]) == (n, d, m, k)
        assert det["recall_at_k"] == 1.0 and det["max_similarity_error"] < 1e-5  # fp32 on the CPU: exact
        assert det["index"]["backend"] == backend and det["index"]["exact"] is True
    km = checks["kmeans cpu"]["details"]["cpu"]
    assert math.isclose(km["objective"], km["objective_f64_from_labels"], rel_tol=1e-3)


def test_neco_train_resume_continues_the_run(quick_run):
    _, report, keep = quick_run
    checks = by_name(report)
    steps, more = selfcheck.QUICK.neco_steps[0], selfcheck.QUICK.neco_more_steps
    train, resume = checks["neco_train train"]["details"], checks["neco_train resume"]["details"]
    assert train["steps"] == steps and len(train["losses"]) == steps and train["images_per_s"] > 0
    assert train["checkpoint_feature_difference"] <= 1e-4
    assert resume["resumed_from_step"] == steps and resume["steps"] == steps + more and len(resume["losses"]) == more
    log = [json.loads(line) for line in (keep / "neco-train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == resume["log_steps"] and log[-1]["step"] == steps + more
    assert log[-1]["images_per_s"] == resume["images_per_s"]


def test_brute_force_helpers_against_numpy():
    g = np.random.default_rng(0)
    keys, queries = torch.from_numpy(g.normal(size=(50, 8))), torch.from_numpy(g.normal(size=(7, 8)))
    sims, idx = selfcheck.brute_force_topk(keys.float(), queries.float(), 5, chunk=3)
    expected = np.argsort(-(queries.numpy() @ keys.numpy().T), axis=1)[:, :5]
    assert np.array_equal(idx.numpy(), expected)
    assert selfcheck.recall_at_k(idx, torch.from_numpy(expected)) == 1.0
    assert selfcheck.recall_at_k(idx[:, [0, 1, 2, 3, 3]], torch.from_numpy(expected)) == pytest.approx(0.8)
    x = g.normal(size=(30, 2)).astype(np.float32)
    labels = np.arange(30) % 3
    manual = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in range(3))
    assert selfcheck.kmeans_objective_f64(x, labels, 3) == pytest.approx(manual, rel=1e-6)


def test_a_broken_backend_is_reported_fail_with_exit_1(tmp_path, monkeypatch):
    real = retrieval.build_index

    class OffByOne:
        def __init__(self, index):
            self.index = index

        def search(self, queries, k):
            sims, idx = self.index.search(queries, k)
            return sims, (idx + 1) % self.index.num_keys

        def describe(self):
            return self.index.describe()

    monkeypatch.setattr(retrieval, "build_index", lambda *a, **kw: OffByOne(real(*a, **kw)))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["selfcheck", "--device", "cpu", "--quick", "--only", "retrieval",
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    assert report["ok"] is False and [c["group"] for c in report["checks"]] == ["environment"] + ["retrieval"] * 3
    for c in report["checks"][1:]:
        assert c["status"] == "FAIL" and "recall@30" in c["reason"] and c["details"]["recall_at_k"] < 0.01
    assert "FAIL" in result.output


def test_an_existing_report_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "report.json"
    out.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["selfcheck", "--device", "cpu", "--quick", "--only", "kmeans", "--out", str(out)])
    assert exc.value.code == 2 and out.read_text() == "keep me"
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["selfcheck", "--device", "cpu", "--only", "nothing", "--out", str(tmp_path / "other.json")])
    assert exc.value.code == 2 and not (tmp_path / "other.json").exists()


def test_distributed_check_compares_two_processes_with_one_once_densebench_supports_it(tmp_path, monkeypatch):
    """The check launches 1 and 2 processes (here a stand-in for the launch), compares their metrics and the
    ranks' forwards; without a densebench.distributed that says it is supported it is a SKIP with the reason."""
    ctx = selfcheck.Context(device="cpu", quick=True, work=tmp_path, sizes=selfcheck.QUICK,
                            shared={"suite": tmp_path / "suite"})
    assert selfcheck.distributed_supported()[0]
    fake = type(sys)("densebench.distributed")
    fake.is_supported = lambda: False
    monkeypatch.setitem(sys.modules, "densebench.distributed", fake)
    check = selfcheck.Check("distributed", "distributed")
    selfcheck.check_distributed(ctx, check)
    assert check.status == "SKIP" and "single-process" in check.reason
    fake.is_supported = lambda: True
    for two, shares, status in ((41.25, [5, 5], "PASS"), (41.5, [5, 5], "FAIL"), (41.25, [10, 0], "FAIL")):
        launched = []

        def launch(cmd, folder, two=two, shares=shares, launched=launched):
            launched.append(cmd)
            if "torch.distributed.run" in cmd:
                return {"returncode": 0, "value": two, "seconds": 1.0, "images_forwarded": 10,
                        "distributed": {"images_forwarded_per_rank": shares}}
            return {"returncode": 0, "value": 41.25, "seconds": 1.0, "images_forwarded": 10}

        monkeypatch.setattr(selfcheck, "_launch", launch)
        check = selfcheck.Check("distributed", "distributed")
        selfcheck.check_distributed(ctx, check)
        assert check.status == status and check.details["difference_points"] == pytest.approx(two - 41.25)
        one, many = launched
        assert one[:3] == [sys.executable, "-m", "densebench"] and "torch.distributed.run" not in one
        assert many[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        assert many[5:8] == ["-m", "densebench", "run"]
        assert many[many.index("--benchmark") + 1] == selfcheck.DISTRIBUTED_BENCHMARK
        assert many[many.index("--input-size") + 1] == "224" and many[many.index("--device") + 1] == "cpu"
        assert many[many.index("--output") + 1] != one[one.index("--output") + 1]
