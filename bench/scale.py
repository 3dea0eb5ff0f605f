"""Benchmark (not a test): the same all-head sweep of the default model, serial and on Ray.

One run measures the zero-ablation cross-entropy sweep of every head of SmolLM2-135M-Instruct on
the same python-docs blocks three ways — the serial executor, Ray with 1 worker, Ray with 2
workers — each into its own run directory through ``hl.run_sweep``, and prints wall time, speed-up
and parallel efficiency against serial, and the largest difference of the result tables (they
must be equal bit for bit). Each Ray worker runs ``--threads`` torch threads; serial runs
``workers x threads`` so that every configuration may use the same cores. Wall times are end to
end (model load, statistics, the cluster's start and every worker's model load included).

    python bench/scale.py --n-blocks 2 --seq-len 128 --threads 1

On a machine with GPUs, ``--gpus-per-worker 1`` gives every worker its own GPU (one actor per
GPU); ``--ray-address auto`` joins a cluster started with ``ray start --head``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _sweep(out: Path, args: argparse.Namespace, **executor: object) -> float:
    import headlab as hl

    start = time.perf_counter()
    hl.run_sweep(
        out=out, data="python-docs", seq_len=args.seq_len, n_blocks=args.n_blocks,
        batch_size=args.n_blocks, methods=["zero"], heads=args.heads, **executor,
    )  # fmt: skip
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-blocks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per Ray worker")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    p.add_argument("--layers", type=int, default=30, help="sweep the heads of the first N layers")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--ray-address", default=None)
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    args.heads = [(ly, h) for ly in range(args.layers) for h in range(9)]

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads * max(counts))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"sweep: SmolLM2-135M, zero ablation of {len(args.heads)} heads one at a time, CE on "
        f"{args.n_blocks} x {args.seq_len} python-docs tokens; Ray workers use {args.threads} "
        f"torch thread(s) each, serial uses {args.threads * max(counts)}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serial = _sweep(tmp / "serial", args)
        want = pd.read_parquet(tmp / "serial" / "results.parquet")
        rows.append(("serial", 1, serial, 0.0))
        torch.set_num_threads(args.threads)  # Ray workers take the driver's torch settings
        for n in counts:
            wall = _sweep(
                tmp / f"ray{n}", args, executor="ray", workers=n,
                gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address,
            )  # fmt: skip
            got = pd.read_parquet(tmp / f"ray{n}" / "results.parquet")
            diff = float((got["value"] - want["value"]).abs().max())
            rows.append((f"ray, {n} worker(s)", n, wall, diff))
    print(f"{'executor':<20}{'wall s':>9}{'speed-up':>10}{'efficiency':>12}{'max |diff|':>12}")
    for name, n, wall, diff in rows:
        speed = serial / wall
        print(f"{name:<20}{wall:>9.1f}{speed:>10.2f}{speed / n:>12.2f}{diff:>12.1e}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
