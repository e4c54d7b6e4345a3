"""How far --precision moves every benchmark's main metric (synthetic suite, seeded random ViT-S/16).

Runs each benchmark of the table with its embedded-default settings once per precision on the chosen device
and prints the main metric and its difference to fp32. On a CPU, fp16 and bf16 are CPU autocast (what a CUDA
run does is measured by `densebench selfcheck --device cuda`). Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import densebench
from densebench.data.synth import ensure_synthetic_suite
from densebench.encoders import load_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="random:vit_small_patch16_224")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = ap.parse_args()
    modes = args.precisions.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        suite = ensure_synthetic_suite(Path(tmp) / "cache")
        encoder = load_encoder(args.model)
        rows = []
        for spec in densebench.benchmarks():
            row = {"benchmark": spec.name, "metric": spec.main_metric}
            for mode in modes:
                r = densebench.evaluate(encoder, benchmarks=spec.name, data_root=suite, device=args.device,
                                        cache_dir=Path(tmp) / "cache", progress=False, precision=mode,
                                        options=dict(spec.synthetic))[0]
                row[mode] = r.main_score
            rows.append(row)
    print(f"{'benchmark':<26}{'metric':<10}" + "".join(f"{m:>9}" for m in modes)
          + "".join(f"{m + '-fp32':>12}" for m in modes[1:]))
    for row in rows:
        print(f"{row['benchmark']:<26}{row['metric']:<10}" + "".join(f"{row[m]:9.2f}" for m in modes)
              + "".join(f"{row[m] - row[modes[0]]:+12.2f}" for m in modes[1:]))
    Path(args.out).write_text(json.dumps({"device": args.device, "model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
