"""The benchmark table, the protocol skeleton, the typed result and declarative option validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import densebench
import densebench.errors as densebench_errors
from densebench import benchmark_table
from densebench.benchmark_table import BenchmarkSpec, BenchmarkTable, benchmarks, get_benchmark
from densebench.encoders import load_encoder
from densebench.errors import ConfigError
from densebench.features import FeatureCache
from densebench.options import option_spec
from densebench.results import Result, read_result, write_result


def test_public_api_is_importable_from_the_top_level():
    assert densebench.Result is Result
    specs = densebench.benchmarks()
    assert [s.name for s in specs] == list(benchmark_table.BENCHMARKS)
    assert densebench.get_benchmark("voc-incontext") is benchmark_table.BENCHMARKS["voc-incontext"]
    assert callable(densebench.evaluate)


def test_table_holds_every_benchmark_once_with_consistent_metadata():
    specs = benchmarks()
    assert len(specs) == 12 and len({s.name for s in specs}) == 12
    for s in specs:
        assert s.main_metric in s.headline_metrics
        assert s.citations and s.description
        assert s.name.startswith(s.dataset.name + "-")
        assert s.default_config().dataset == s.dataset.name
        assert hasattr(s.protocol, "run") and s.protocol.Config is s.config_class
    assert get_benchmark("voc-overcluster").main_metric == "miou@500"
    assert get_benchmark("voc-overcluster").headline_metrics == ("miou@gt", "miou@300", "miou@500")


def test_table_refuses_duplicate_names_and_unknown_lookups():
    spec = get_benchmark("voc-linear")
    with pytest.raises(ValueError, match="defined twice"):
        BenchmarkTable([spec, spec])
    with pytest.raises(ConfigError, match="unknown benchmark 'voc-lineer'.*voc-linear"):
        get_benchmark("voc-lineer")


def test_main_metric_must_be_a_headline_metric():
    spec = get_benchmark("voc-linear")
    with pytest.raises(ValueError, match="main metric"):
        dataclasses.replace(spec, main_metric="pixel_accuracy")


def test_every_config_field_is_declared_and_non_semantic_fields_come_from_the_declarations():
    for s in benchmarks():
        for f in dataclasses.fields(s.config_class):
            assert option_spec(f) is not None, f"{s.protocol_name}.Config.{f.name} has no option declaration"
        assert {"batch_size", "num_workers"} <= s.non_semantic_fields
        assert all(o.help for o in s.config_class.options())


@pytest.mark.parametrize("benchmark, options, flag", [
    ("voc-incontext", {"backend": "fiass"}, "--backend"),
    ("voc-incontext", {"query_chunk": -3}, "--query-chunk"),
    ("voc-incontext", {"batch_size": 0}, "--batch-size"),
    ("voc-incontext", {"num_workers": -1}, "--num-workers"),
    ("voc-incontext", {"temperature": 0.0}, "--temperature"),
    ("voc-linear", {"batch_size": 0}, "--batch-size"),
    ("voc-linear", {"momentum": 1.0}, "--momentum"),
    ("voc-overcluster", {"num_workers": -1}, "--num-workers"),
    ("voc-overcluster", {"matching": "greedy"}, "--matching"),
    ("spair-correspondence", {"num_workers": -2}, "--num-workers"),
    ("spair-correspondence", {"upsample": 17}, "--upsample"),
])
def test_bad_options_are_refused_before_any_forward(synth_root, benchmark, options, flag):
    encoder = load_encoder("pixels")
    with pytest.raises(ConfigError, match=flag):
        densebench.evaluate(encoder, benchmarks=benchmark, data_root=synth_root, progress=False, use_cache=False,
                            options=options)
    assert encoder.images_forwarded == 0


def test_linear_head_batch_larger_than_the_split_is_refused_up_front_with_drop_last(synth_root, tmp_path):
    encoder = load_encoder("pixels")
    with pytest.raises(ConfigError, match="--head-batch-size"):
        densebench.evaluate(encoder, benchmarks="voc-linear", data_root=synth_root, progress=False,
                            cache_dir=tmp_path, options={"head_batch_size": 100_000, "drop_last": True})
    assert encoder.images_forwarded == 0


def test_list_benchmarks_options_shows_declared_choices_and_help():
    from typer.testing import CliRunner

    from densebench.cli import app

    res = CliRunner().invoke(app, ["list", "benchmarks", "--options", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    backend = next(o for o in data["voc-incontext"]["options"] if o["name"] == "backend")
    assert backend["accepts"] == "auto|torch|faiss|faiss-ivf" and "k-NN backend" in backend["help"]
    chunk = next(o for o in data["voc-incontext"]["options"] if o["name"] == "query_chunk")
    assert chunk["accepts"] == ">= 0" and chunk["non_semantic"] is True


@pytest.fixture(scope="module")
def table_results(synth_root, tmp_path_factory):
    """Every benchmark of the table, end to end on the synthetic suite, through the one skeleton."""
    cache = FeatureCache(tmp_path_factory.mktemp("table-cache"))
    encoder = load_encoder("pixels")
    out = {}
    for s in benchmarks():
        config = s.default_config(**s.synthetic)
        out[s.name] = (config, s.run(encoder, synth_root, config, cache=cache, progress=False))
    return out


@pytest.mark.slow
def test_every_benchmark_runs_end_to_end_through_the_skeleton(table_results, tmp_path):
    for name, (config, result) in table_results.items():
        spec = get_benchmark(name)
        assert isinstance(result, Result) and result.benchmark == name
        score = result.main_score
        assert score is not None and math.isfinite(score) and 0.0 <= score <= 100.0, (name, score)
        for m in spec.headline_metrics:
            if m in ("miou@300",) and "300" not in config.clusters:
                continue
            assert m in result.metrics, (name, m)
        # The config block is exactly the resolved Config: its fields and nothing derived.
        assert set(result.config) == {f.name for f in dataclasses.fields(config)}, name
        assert isinstance(result.derived, dict) and result.derived, name
        timings = result.provenance["timings"]
        assert timings["total_s"] >= timings["protocol_s"] >= 0 and "forward_s" in timings
        path = write_result(result, tmp_path / f"{name}.json")
        assert read_result(path) == result


@pytest.mark.slow
def test_resolved_configs_match_the_canonical_resolver(table_results):
    from densebench.leaderboard import check_config

    for name, (_, result) in table_results.items():
        semantic, canonical, reasons = check_config(result)
        spec = get_benchmark(name)
        changed = {k for k in spec.synthetic if canonical.get(k) != semantic.get(k)}
        # Synthetic data, plus the embedded default's own reductions (and what follows from them: the linear
        # probe's eval size is its input size), make it non-standard; nothing else differs.
        assert reasons[0] == "measured on synthetic data"
        fields = {r.split("=")[0] for r in reasons[1:]}
        assert changed <= fields and fields - changed <= {"eval_size"}, (name, reasons)


def test_protocol_modules_do_not_register_benchmarks():
    from densebench.protocols import correspondence, incontext, linear, overcluster

    for module in (incontext, linear, overcluster, correspondence):
        assert not hasattr(module, "register") and not hasattr(module, "Benchmark")
        assert callable(module.prepare) and callable(module.extract_features) and callable(module.score)


def test_spec_is_frozen():
    spec = get_benchmark("voc-incontext")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.synthetic["input_size"] = 1  # type: ignore[index]
    assert isinstance(spec, BenchmarkSpec)


@pytest.mark.slow
def test_results_table_has_one_row_per_result(table_results):
    results = [r for _, r in table_results.values()]
    df = densebench.to_pandas(results)
    assert len(df) == len(results) and set(df["benchmark"]) == set(table_results)
    for (_, r), (_, row) in zip(table_results.values(), df.iterrows(), strict=True):
        assert row["score"] == r.main_score and row["model"] == r.model_name and bool(row["synthetic"])
        assert row["main_metric"] == get_benchmark(r.benchmark).main_metric
        assert row[row["main_metric"]] == r.main_score
    pivot = df.pivot_table(index="model", columns="benchmark", values="score")
    assert pivot.shape == (1, len(results))


def test_evaluate_accepts_a_timm_module_fingerprinted_from_its_weights(synth_root, tmp_path):
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    opts = {"input_size": 64, "augment_epochs": 1}
    first = densebench.evaluate(net, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                                progress=False, options=opts)[0]
    assert first.model["fingerprint"].startswith("sha256:") and first.model_name == "VisionTransformer"
    with torch.no_grad():
        net.blocks[0].mlp.fc1.weight.add_(1.0)        # other weights: another fingerprint, no cache reuse
    second = densebench.evaluate(net, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                                 progress=False, options=opts)[0]
    assert second.model["fingerprint"] != first.model["fingerprint"]
    assert second.provenance["cache"]["images_forwarded"] > 0


def test_a_caller_fingerprint_that_collides_never_reuses_other_weights(synth_root, tmp_path):
    opts = {"input_size": 64, "augment_epochs": 1}
    a, b = load_encoder("random:vit_tiny_patch16_224"), load_encoder("random:vit_tiny_patch16_224", seed=1)
    a.fingerprint = b.fingerprint = "my-model-v1"       # the same caller-chosen name for different weights
    ra = densebench.evaluate(a, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                             progress=False, options=opts)[0]
    rb = densebench.evaluate(b, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                             progress=False, options=opts)[0]
    assert rb.provenance["cache"]["images_forwarded"] == ra.provenance["cache"]["images_forwarded"] > 0
    assert a.weights_hash and b.weights_hash and a.weights_hash != b.weights_hash


def test_evaluate_refuses_what_is_not_a_model():
    with pytest.raises(densebench_errors.ModelError, match="cannot evaluate a dict"):
        densebench.evaluate({"not": "a model"}, benchmarks="voc-incontext", data_root=".")
