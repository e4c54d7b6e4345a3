"""The GPU self-check as a script: the same command as ``densebench selfcheck`` (densebench/selfcheck.py).

Run it whenever a GPU is at hand; it takes at most 8 minutes on one GPU, exercises every CUDA path (each
benchmark on CUDA and on the CPU, every retrieval backend, GPU k-means, neco_train in bf16 with a checkpoint,
a resume and --compile, a 2-process torchrun) and writes one JSON report. Exit 0: no check failed; 1: one did.

    python bench/gpu_check.py [--device auto|cpu|cuda] [--quick] [--out report.json] [--keep DIR] [--only GROUP]
"""

from __future__ import annotations

import sys

from densebench.cli import main

if __name__ == "__main__":
    main(["selfcheck", *sys.argv[1:]])
