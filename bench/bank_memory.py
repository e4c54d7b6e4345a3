"""Peak host memory of loading and searching an in-context memory bank: the former recipe vs densebench's.

A cache-like bank is written once to a temporary folder: float16 keys (N, D) and uint8 label counts (N, C),
each split in two arrays like the two augmentation epochs' cache entries, read back as memory maps. Each
way of loading runs in a child process that records its resident set (VmRSS) as the baseline, resets the peak
(/proc/self/clear_refs), loads the bank, runs one k-NN search call over all of it with the label transfer's
gather, and reports the peak (VmHWM) above the baseline, as a ratio to the float16 key bytes:

- ``before``: the former ``score``: keys concatenated (float16) then converted to one float32 tensor, an
  exact torch index over it, labels concatenated; ``before-faiss``: the same plus a faiss IndexFlatIP over
  the float32 keys (the former ``--backend auto`` with faiss-cpu installed).
- ``now``: the protocol's own ``BankSearch`` (densebench.protocols.incontext) on the CPU: the memory-mapped
  bank searched in place, one float16 block converted at a time; ``now-faiss``: ``--backend faiss``, keys
  added a block at a time (faiss stores float32: twice the bank, by construction).

The memory-mapped pages a search reads count in the resident set (they are the bank itself), so the floor of
any search over the whole bank is ~1.0x. The CUDA path (keys streamed into one float16 device tensor) holds one
block on the host; it needs a GPU and is not measured here.

    python bench/bank_memory.py [--rows 2000000] [--dim 384] [--classes 21] [--queries 256]
                                [--json bench/results/bank_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("before", "before-faiss", "now", "now-faiss")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_bank(folder: Path, rows: int, dim: int, classes: int, seed: int = 0) -> list[dict]:
    """Two epochs' worth of cache-like arrays (unit float16 keys, uint8 counts), written block by block."""
    rng = np.random.default_rng(seed)
    specs = []
    for epoch, n in enumerate((rows // 2, rows - rows // 2)):
        keys = np.lib.format.open_memmap(folder / f"keys{epoch}.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        labels = np.lib.format.open_memmap(folder / f"labels{epoch}.npy", mode="w+", dtype=np.uint8,
                                           shape=(n, classes))
        for a in range(0, n, 1 << 16):
            b = min(n, a + (1 << 16))
            x = rng.standard_normal((b - a, dim), dtype=np.float32)
            keys[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
            labels[a:b] = rng.integers(0, 17, (b - a, classes), dtype=np.uint8)
        keys.flush()
        labels.flush()
        del keys, labels
        specs.append({"keys": str(folder / f"keys{epoch}.npy"), "labels": str(folder / f"labels{epoch}.npy")})
    return specs


def child(mode: str, specs: list[dict], n_queries: int, k: int) -> dict:
    """Load the bank ``mode``'s way and search it once; the peak resident set above the baseline."""
    import torch
    import torch.nn.functional as F

    from densebench import distributed
    from densebench.protocols import incontext
    from densebench.retrieval import StackedRows, build_index

    keys = [np.load(s["keys"], mmap_mode="r") for s in specs]
    labels = [np.load(s["labels"], mmap_mode="r") for s in specs]
    dim = keys[0].shape[1]
    queries = F.normalize(torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    base = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    if mode.startswith("before"):
        bank = torch.from_numpy(np.concatenate([np.asarray(a) for a in keys])).float()
        label_bank = torch.from_numpy(np.concatenate([np.asarray(a) for a in labels]))
        index = build_index(bank, "torch", "cpu")
        if mode == "before-faiss":
            import faiss

            index = faiss.IndexFlatIP(dim)
            index.add(bank.numpy())
            _, idx = index.search(queries.numpy(), k)
            idx = torch.from_numpy(idx)
        else:
            idx = index.search(queries, k)[1]
        gathered = label_bank[idx]
    elif mode == "now":
        rows, label_rows = StackedRows(keys), StackedRows(labels)
        config = incontext.Config(input_size=448)
        plan = incontext.search_plan(config, "cpu", len(rows), n_queries, labels[0].shape[1])
        search = incontext.BankSearch(config, rows, label_rows, plan, torch.device("cpu"), distributed.current(),
                                      None)
        pad = -n_queries % plan.search_block
        _, idx = search(F.pad(queries, (0, 0, 0, pad)))
        gathered = search.labels[idx[:n_queries]]
    else:
        index = build_index(StackedRows(keys), "faiss", "cpu")
        idx = index.search(queries, k)[1]
        gathered = StackedRows(labels)[idx]
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"mode": mode, "baseline_rss": base, "peak_rss": peak, "peak_above_baseline": peak - base,
            "hwm_reset": reset, "seconds": seconds, "gathered_rows": int(gathered.shape[0] * gathered.shape[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="memory-bank rows (at least 2M for the issue)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--queries", type=int, default=256, help="queries of the one search call (the whole bank read)")
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, spec_file = args.child.split(":", 1)
        print(json.dumps(child(mode, json.loads(Path(spec_file).read_text()), args.queries, args.k)))
        return

    with tempfile.TemporaryDirectory(prefix="densebench-bank-") as tmp:
        folder = Path(tmp)
        specs = write_bank(folder, args.rows, args.dim, args.classes)
        (folder / "specs.json").write_text(json.dumps(specs))
        key_bytes = args.rows * args.dim * 2
        label_bytes = args.rows * args.classes
        runs = []
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{folder / 'specs.json'}",
                                  "--queries", str(args.queries), "--k", str(args.k)],
                                 capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["ratio_to_fp16_keys"] = run["peak_above_baseline"] / key_bytes
            run["ratio_to_fp16_keys_and_labels"] = run["peak_above_baseline"] / (key_bytes + label_bytes)
            runs.append(run)
    print(f"memory bank {args.rows:,} x {args.dim} float16 keys ({key_bytes / 2**30:.2f} GiB) + {args.classes} uint8 "
          f"label counts ({label_bytes / 2**20:.0f} MiB); one search of {args.queries} queries, k={args.k}")
    print(f"{'mode':>14}  {'peak above baseline':>20}  {'x fp16 keys':>11}  {'x keys+labels':>13}  {'seconds':>8}")
    for r in runs:
        print(f"{r['mode']:>14}  {r['peak_above_baseline'] / 2**30:17.2f} GiB  {r['ratio_to_fp16_keys']:11.2f}  "
              f"{r['ratio_to_fp16_keys_and_labels']:13.2f}  {r['seconds']:8.1f}")
    print("target: peak host RAM <= 1.25x the float16 bank above the process baseline")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "dim": args.dim, "classes": args.classes,
                                         "queries": args.queries, "k": args.k, "fp16_key_bytes": key_bytes,
                                         "label_bytes": label_bytes, "machine": platform.machine(),
                                         "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
