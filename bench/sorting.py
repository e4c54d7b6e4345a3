"""soft_sort vs diffsort 0.2.0 at NeCo's size: n = 49 references, N = 64·49 rows, steepness 100.

Measured in one run, same inputs, same upstream gradient (a random weight on every entry of P):
  - agreement: max |ΔP|, max |Δ sorted|, max relative difference of the input gradient (target |ΔP| < 1e-5);
  - time of forward + backward, median over interleaved repeats, as wall time and as process CPU time
    (the machine may be shared; CPU time is less sensitive to other load); target >= 5x faster;
  - memory, two ways (target >= 5x less):
      saved: bytes of the distinct tensor storages autograd keeps between forward and backward
             (``torch.autograd.graph.saved_tensors_hooks``);
      peak:  the high-water mark of tensor bytes allocated during forward + backward, from the CPU
             allocation timeline of ``torch.profiler`` (profile_memory; ``_memory_profile``), relative
             to the start (inputs and the upstream gradient are allocated before).
Writes bench/results/sorting.json. Not part of the test suite (no timing assertions anywhere).

    OMP_NUM_THREADS=1 python bench/sorting.py [--rows 3136] [--n 49] [--steepness 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _diffsort(network: str, n: int, steepness: float):
    from diffsort import DiffSortNet

    sorter = DiffSortNet(network, n, steepness=steepness)
    return lambda x: sorter(x)


def _ours(network: str, steepness: float):
    from neco_train.sorting import soft_sort

    return lambda x: soft_sort(x, steepness, network)


def _run(fn, x: torch.Tensor, weight: torch.Tensor):
    leaf = x.clone().requires_grad_(True)
    values, perm = fn(leaf)
    (perm * weight).sum().backward()
    return values.detach(), perm.detach(), leaf.grad


def _timed(fn, x, weight) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    _run(fn, x, weight)
    return time.perf_counter() - wall, time.process_time() - cpu


def _saved_bytes(fn, x) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    leaf = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaf)
    return sum(storages.values())


def _peak_bytes(fn, x, weight) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    leaf = x.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        values, perm = fn(leaf)
        (perm * weight).sum().backward()
        del values, perm
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure(network: str, rows: int, n: int, steepness: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(rows, n, generator=gen) * 2 - 1          # cosine similarities live in [-1, 1]
    weight = torch.randn(rows, n, n, generator=gen)
    ours, theirs = _ours(network, steepness), _diffsort(network, n, steepness)
    v1, p1, g1 = _run(ours, x, weight)
    v2, p2, g2 = _run(theirs, x, weight)
    agreement = {"max_abs_dP": float((p1 - p2).abs().max()), "max_abs_dsorted": float((v1 - v2).abs().max()),
                 "max_rel_dgrad": float((g1 - g2).abs().max() / g2.abs().max())}
    times = {"ours": [], "diffsort": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        times["ours"].append(_timed(ours, x, weight))
        times["diffsort"].append(_timed(theirs, x, weight))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    saved = {"ours": _saved_bytes(ours, x), "diffsort": _saved_bytes(theirs, x)}
    peak = {"ours": _peak_bytes(ours, x, weight), "diffsort": _peak_bytes(theirs, x, weight)}
    return {
        "network": network, "rows": rows, "n": n, "steepness": steepness, "repeats": repeats,
        "threads": torch.get_num_threads(), "agreement": agreement,
        "wall_s": {k: v[0] for k, v in med.items()}, "cpu_s": {k: v[1] for k, v in med.items()},
        "speedup_wall": med["diffsort"][0] / med["ours"][0], "speedup_cpu": med["diffsort"][1] / med["ours"][1],
        "saved_bytes": saved, "saved_ratio": saved["diffsort"] / max(1, saved["ours"]),
        "peak_bytes": peak, "peak_ratio": peak["diffsort"] / max(1, peak["ours"]),
        "P_bytes": rows * n * n * 4,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64 * 49)
    ap.add_argument("--n", type=int, default=49)
    ap.add_argument("--steepness", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--networks", default="bitonic,odd_even")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sorting.json"))
    args = ap.parse_args()

    results = [measure(net, args.rows, args.n, args.steepness, args.repeats) for net in args.networks.split(",")]
    mb = lambda b: f"{b / 2**20:9.1f}"
    print(f"soft_sort vs diffsort 0.2.0: N={args.rows} rows, n={args.n}, steepness {args.steepness}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'network':10s}{'max|dP|':>10s}{'wall ours/ds (s)':>20s}{'x':>7s}{'cpu x':>7s}"
          f"{'saved MiB ours/ds':>22s}{'x':>7s}{'peak MiB ours/ds':>22s}{'x':>7s}")
    for r in results:
        print(f"{r['network']:10s}{r['agreement']['max_abs_dP']:10.1e}"
              f"{r['wall_s']['ours']:9.3f} /{r['wall_s']['diffsort']:8.3f}{r['speedup_wall']:7.1f}"
              f"{r['speedup_cpu']:7.1f}{mb(r['saved_bytes']['ours'])} /{mb(r['saved_bytes']['diffsort'])}"
              f"{r['saved_ratio']:7.1f}{mb(r['peak_bytes']['ours'])} /{mb(r['peak_bytes']['diffsort'])}"
              f"{r['peak_ratio']:7.1f}")
    print("targets (bitonic): >= 5x faster, >= 5x less memory, max |dP| < 1e-5")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
