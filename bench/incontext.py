"""In-context benchmark: where does the time go, and what does the cache buy?

Runs voc-incontext on the synthetic suite with a randomly initialised ViT-S/16 twice (cold cache,
then warm cache) and prints, from this one run:
  - backbone forward time vs the whole run (target: everything that is not the forward < 25 % of total),
  - warm-cache speed-up of the second run (target: >= 5x), and its forward count (must be 0).
Writes bench/results/incontext.json. Not part of the test suite (no timing assertions anywhere).

    python bench/incontext.py [--model random:vit_small_patch16_224] [--input-size 224] [--scale default]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from densebench.data.synth import write_synthetic_suite
from densebench.encoders import load_encoder
from densebench.features import FeatureCache
from densebench.benchmark_table import get_benchmark
from densebench.api import build_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vit_small_patch16_224")
    ap.add_argument("--benchmark", default="voc-incontext")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "incontext.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_suite(tmp / "data", seed=0)
        bench = get_benchmark(args.benchmark)
        cfg = build_config(bench, {"input_size": args.input_size})
        enc = load_encoder(args.model)
        cache = FeatureCache(tmp / "cache")
        rows = []
        for label in ("cold cache", "warm cache"):
            before = enc.images_forwarded
            t0 = time.perf_counter()
            res = bench.module().run(enc, tmp / "data", cfg, device="cpu", cache=cache, progress=False,
                                     benchmark=bench.name)
            wall = time.perf_counter() - t0
            t = res["provenance"]["timings"]
            rows.append({"run": label, "wall_s": wall, "forward_s": t["forward_s"],
                         "extraction_s": t["extraction_s"], "protocol_s": t["protocol_s"],
                         "forwards": enc.images_forwarded - before, "miou": res["metrics"]["miou"]})
    cold, warm = rows
    non_forward = (cold["wall_s"] - cold["forward_s"]) / cold["wall_s"]
    speedup = cold["wall_s"] / warm["wall_s"]
    print(f"{'run':<12}{'wall s':>9}{'forward s':>11}{'extract s':>11}{'protocol s':>12}{'forwards':>10}{'mIoU':>8}")
    for r in rows:
        print(f"{r['run']:<12}{r['wall_s']:>9.2f}{r['forward_s']:>11.2f}{r['extraction_s']:>11.2f}"
              f"{r['protocol_s']:>12.2f}{r['forwards']:>10d}{r['miou']:>8.2f}")
    print(f"\nnot-forward share of the cold run: {100 * non_forward:.1f} %  (target < 25 %)")
    print(f"warm-cache speed-up: {speedup:.1f}x  (target >= 5x); warm-run forwards: {warm['forwards']} (must be 0)")
    report = {"model": args.model, "benchmark": args.benchmark, "input_size": args.input_size, "runs": rows,
              "non_forward_share": non_forward, "warm_speedup": speedup}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
