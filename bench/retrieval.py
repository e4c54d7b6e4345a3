"""Exact k-NN on the CPU: torch (blocked matmul + top-k) vs faiss IndexFlatIP, same data, same run.

Prints a table of search times and the torch/faiss time ratio per bank size, plus the agreement of
the two top-k lists, and writes the numbers as JSON. Random unit vectors stand in for patch features:
exact search cost depends only on the sizes, not on the values.

    python bench/retrieval.py [--sizes 10000,50000,200000] [--dim 384] [--queries 2048] [--k 30]
                              [--threads N] [--repeats 3] [--json bench/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from densebench.retrieval import build_index


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,50000,200000", help="comma list of memory-bank sizes N")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch (and therefore faiss) threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    queries = _unit(rng, args.queries, args.dim)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        keys = _unit(rng, n, args.dim)
        t_build_torch, torch_index = _best_time(lambda keys=keys: build_index(keys, "torch"), 1)
        t_build_faiss, faiss_index = _best_time(lambda keys=keys: build_index(keys, "faiss"), 1)
        t_torch, (s_t, i_t) = _best_time(lambda ix=torch_index: ix.search(queries, args.k), args.repeats)
        t_faiss, (s_f, i_f) = _best_time(lambda ix=faiss_index: ix.search(queries, args.k), args.repeats)
        same_idx = float((i_t == i_f).float().mean())
        max_sim_diff = float((s_t - s_f).abs().max())
        rows.append({"n_keys": n, "torch_s": t_torch, "faiss_s": t_faiss,
                     "torch_over_faiss": t_torch / t_faiss,
                     "build_torch_s": t_build_torch, "build_faiss_s": t_build_faiss,
                     "gflops_torch": 2 * args.queries * n * args.dim / t_torch / 1e9,
                     "same_indices": same_idx, "max_sim_diff": max_sim_diff})

    print(f"exact inner-product top-{args.k}, {args.queries} queries x D={args.dim}, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats}")
    print(f"{'N keys':>9} {'torch s':>9} {'faiss s':>9} {'torch/faiss':>12} {'same idx':>9} "
          f"{'max |dsim|':>11}")
    for r in rows:
        print(f"{r['n_keys']:>9} {r['torch_s']:>9.3f} {r['faiss_s']:>9.3f} {r['torch_over_faiss']:>12.2f} "
              f"{r['same_indices']:>9.4f} {r['max_sim_diff']:>11.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"dim": args.dim, "queries": args.queries, "k": args.k, "threads": torch.get_num_threads(),
                "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
                "faiss": faiss_index.describe()["faiss_version"]}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
