"""`densebench run` under torchrun (2 processes, gloo, CPU) against 1 process.

Prints, from this one run:

  1. every benchmark on the synthetic suite (its embedded-default settings) with a seeded random ViT-S/16: the
     metric of 1 and of 2 processes (must be equal; the linear probe's DDP head may differ in the last digits,
     see docs/linear.md), the total forwards (must be equal) and each rank's share (even up to one batch);
  2. extraction wall time of 2 processes as a ratio to 1 process, for the memory-bank extraction of
     voc-incontext at 512 px on the VOC-sized set (800 + 100 images of ~500x375) with a near-zero-cost encoder
     (bench/engine.py's NullEncoder, loaded as a plugin), where the data path is the whole cost; with the
     random ViT-S/16 on the synthetic suite, where the CPU forward is; and with a simulated accelerator (the
     null encoder waiting 50 ms per image, the CPU idle meanwhile, as during a GPU forward), where the work
     is what N devices split.

Both processes share this machine's cores: on 2 CPU cores two ranks have no more compute than one process
with 2 threads and 2 data workers, so the ratio here measures overhead (rendezvous, part entries, assembly), not
the speed-up N GPUs give. Writes bench/results/distributed.json. No timing assertions anywhere.

    python bench/distributed.py [--benchmarks all] [--skip-bench] [--skip-timing] [--batch-size 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from densebench.benchmark_table import select  # noqa: E402
from densebench.data.synth import ensure_synthetic_suite  # noqa: E402
from densebench.paths import cache_dir  # noqa: E402

MODEL = "random:vit_small_patch16_224"
NULL = f"{BENCH / 'engine.py'}:NullEncoder"
DEVICE_BOUND = f"{Path(__file__).resolve()}:DeviceBoundEncoder"
#: seconds of simulated accelerator time per image (a GPU forward costs the CPU next to nothing)
DEVICE_S_PER_IMAGE = 0.05


def _null_encoder():
    from engine import NullEncoder

    return NullEncoder


class DeviceBoundEncoder(_null_encoder()):
    """The null encoder plus a fixed wait per image in place of a GPU forward: the work N devices split. It
    sleeps (the CPU is free meanwhile, as while a GPU computes), so 2 ranks on 2 cores can show the split."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.name, self.fingerprint = "device-bound-null", f"device-bound-null-{DEVICE_S_PER_IMAGE}-v1"

    def _features(self, images, layer, norm):
        time.sleep(DEVICE_S_PER_IMAGE * images.shape[0])
        return super()._features(images, layer, norm)


def _flags(options: dict) -> list[str]:
    out = []
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


def launch(n: int, args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, "-m", "densebench", *args], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{n}-process run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def every_benchmark(names: str, work: Path, env: dict, batch_size: int | None = None) -> list[dict]:
    suite = ensure_synthetic_suite(cache_dir(None))
    rows = []
    print(f"{'benchmark':26} {'1 process':>10} {'2 processes':>12} {'forwards':>9} {'per rank':>12} {'wall 2/1':>8}")
    for bench in select(names.split(",")):
        got = {}
        for n in (1, 2):
            folder = work / f"{bench.name}-{n}"
            args = ["run", "-m", MODEL, "-b", bench.name, "--data-root", str(suite), "--device", "cpu",
                    "--cache-dir", str(folder / "cache"), "-o", str(folder / "r.json"), "--quiet",
                    *_flags(bench.synthetic), *(["--batch-size", str(batch_size)] if batch_size else [])]
            wall, _ = launch(n, args, env)
            got[n] = (wall, read(folder / "r.json"))
        (w1, r1), (w2, r2) = got[1], got[2]
        m = bench.main_metric
        shares = r2["derived"]["distributed"]["images_forwarded_per_rank"]
        row = {"benchmark": bench.name, "metric": m, "one": r1["metrics"][m], "two": r2["metrics"][m],
               "equal": r1["metrics"] == r2["metrics"], "forwards_one": r1["provenance"]["cache"]["images_forwarded"],
               "forwards_two": r2["provenance"]["cache"]["images_forwarded"], "per_rank": shares,
               "scoring": r2["derived"]["distributed"]["scoring"], "wall_one_s": w1, "wall_two_s": w2}
        rows.append(row)
        print(f"{bench.name:26} {row['one']:10.4f} {row['two']:12.4f} {row['forwards_two']:9d} "
              f"{str(shares):>12} {w2 / w1:8.2f}" + ("" if row["equal"] else "  (metrics differ)"), flush=True)
    return rows


def extraction_timing(work: Path, env: dict, only: tuple[str, ...] = ("null", "ViT", "simulated")) -> list[dict]:
    from engine import voc_sized_root

    out = []
    suite = ensure_synthetic_suite(cache_dir(None))
    cases = [("null encoder, VOC-sized 800+100 @512", NULL, lambda: voc_sized_root(800, 100), ["--input-size", "512"]),
             ("random ViT-S/16, synthetic suite @224", MODEL, lambda: suite, ["--input-size", "224"]),
             (f"simulated accelerator ({DEVICE_S_PER_IMAGE * 1000:.0f} ms/image), synthetic suite @224", DEVICE_BOUND,
              lambda: suite, ["--input-size", "224", "--batch-size", "4"])]
    for label, model, root, extra in [c for c in cases if any(w in c[0] for w in only)]:
        root = root()
        times = {}
        for n in (1, 2):
            folder = work / f"timing-{len(out)}-{n}"
            args = ["run", "-m", model, "-b", "voc-incontext", "--data-root", str(root), "--device", "cpu",
                    "--cache-dir", str(folder / "cache"), "-o", str(folder / "r.json"), "--quiet", *extra]
            wall, _ = launch(n, args, env)
            r = read(folder / "r.json")
            times[n] = {"wall_s": wall, "extraction_s": max(r["derived"].get("distributed", {}).get(
                "extraction_s_per_rank", [r["provenance"]["timings"]["extraction_s"]])), "miou": r["metrics"]["miou"]}
        ratio = times[2]["extraction_s"] / times[1]["extraction_s"]
        out.append({"case": label, **{f"{k}_{n}": v for n, t in times.items() for k, v in t.items()},
                    "extraction_ratio": ratio})
        print(f"{label}: extraction {times[2]['extraction_s']:.1f} s (2 processes, slowest rank) vs "
              f"{times[1]['extraction_s']:.1f} s (1) = {ratio:.2f}x; wall {times[2]['wall_s']:.0f} vs "
              f"{times[1]['wall_s']:.0f} s; mIoU {times[2]['miou']:.4f} vs {times[1]['miou']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", default="all")
    ap.add_argument("--skip-bench", action="store_true", help="skip part 1 (every benchmark)")
    ap.add_argument("--skip-timing", action="store_true", help="skip part 2 (extraction wall time)")
    ap.add_argument("--batch-size", type=int, default=None, help="part 1's forward batch (default: each protocol's; "
                    "the ranks split whole batches, so on the small suite 4 shows the even split)")
    ap.add_argument("--out", default=str(BENCH / "results" / "distributed.json"))
    ap.add_argument("--timing-cases", default="null,ViT,simulated", help="part 2's cases (null, ViT, simulated)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    print(f"{os.cpu_count()} CPU cores; torchrun --standalone --nproc-per-node 2, gloo", flush=True)
    with tempfile.TemporaryDirectory(prefix="densebench-dist-") as tmp:
        work = Path(tmp)
        report = {"cores": os.cpu_count()}
        if not args.skip_bench:
            report["batch_size"] = args.batch_size
            report["benchmarks"] = every_benchmark(args.benchmarks, work, env, args.batch_size)
        if not args.skip_timing:
            report["extraction"] = extraction_timing(work, env, tuple(args.timing_cases.split(",")))
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
