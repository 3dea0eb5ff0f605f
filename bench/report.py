"""Benchmark (not a test): the head atlas's size and load time in Chromium.

Writes a synthetic run set of a 32 x 32 model (1,024 heads: a sweep with three methods and two
metrics, a detect run with three detectors; the model itself cannot be loaded, so the cards have
no patterns), builds its atlas, and measures the file's size and the time from navigation start
to the first heatmap drawn (``window.atlasReady``, set by the page) in headless Chromium with the
network off, as the median of several loads. Give run directories to measure their atlas too::

    python bench/report.py                   # the synthetic 1,024-head atlas
    python bench/report.py runs/demo         # ... and the atlas of the demo run

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (dev extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import headlab as hl
from headlab.batch import Batch
from headlab.runs import RunDir

RESULT = Path(__file__).with_name("last_report.txt")
FINGERPRINT = "5" * 64


def synthetic_runs(root: Path, n_layers: int = 32, n_heads: int = 32, seed: int = 0) -> list[Path]:
    """A sweep (zero, mean, peak x ce, top1; 8 examples) and a detect run of a fictitious
    ``n_layers x n_heads`` model, written as headlab run directories."""
    rng = np.random.default_rng(seed)
    layer, head = (a.ravel() for a in np.meshgrid(range(n_layers), range(n_heads), indexing="ij"))
    ident = {"model": f"synthetic-{n_layers}x{n_heads}", "dtype": "float32",
             "model_fingerprint": FINGERPRINT, "data": "python-docs", "seq_len": 128,
             "n_blocks": 8}  # fmt: skip
    tokens = Batch(input_ids=torch.randint(0, 1000, (8, 128)))
    rows = []
    for method in ("zero", "mean", "peak"):
        for metric, base, sign in (("ce", 3.2, 1.0), ("top1", 0.41, -1.0)):
            delta = rng.standard_t(3, layer.size) * 0.01 * rng.gamma(1.0, 1.0, layer.size)
            sd = np.abs(rng.normal(0.02, 0.01, layer.size)) + 1e-4
            rows.append(pd.DataFrame({
                "layer": layer, "head": head, "method": method, "metric": metric,
                "value": base + delta, "baseline": base, "delta": delta, "delta_sd": sd,
                "delta_se": sd / np.sqrt(8), "n": 8, "effect": sign * delta,
            }))  # fmt: skip
    sweep = root / "sweep"
    with RunDir.open(sweep, kind="sweep", identity={**ident, "methods": ["zero", "mean", "peak"]},
                     command=["headlab", "sweep", "(synthetic)"]) as run:  # fmt: skip
        run.save_tokens(tokens)
        run.save_table("results.parquet", pd.concat(rows, ignore_index=True))
        run.set_status("complete")
    detect = root / "detect"
    with RunDir.open(detect, kind="detect", identity=ident,
                     command=["headlab", "detect", "(synthetic)"]) as run:  # fmt: skip
        table = pd.concat([
            pd.DataFrame({"layer": layer, "head": head, "metric": d,
                          "value": rng.beta(1, 6, layer.size), "n": 8, "measure": "mul",
                          "exclude_bos": False, "exclude_current": False})
            for d in ("previous_token", "duplicate_token", "induction")
        ], ignore_index=True)  # fmt: skip
        run.save_table("results.parquet", table)
        run.set_status("complete")
    return [sweep, detect]


def load_times(path: Path, repeats: int = 5) -> list[float]:
    """Seconds from navigation start to the first heatmap drawn, one per fresh load."""
    from headlab.atlas.browser import headless_chromium

    driver = headless_chromium()
    times = []
    try:
        for _ in range(repeats):
            driver.get("about:blank")
            driver.get(path.resolve().as_uri())
            end = time.monotonic() + 60
            ready = None
            while ready is None and time.monotonic() < end:
                ready = driver.execute_script("return window.atlasReady ?? null")
                time.sleep(0.05)
            if ready is None:
                raise RuntimeError(f"{path} never drew its heatmap")
            times.append(float(ready) / 1000)  # performance.now(): ms since navigation start
    finally:
        driver.quit()
    return times


def measure(label: str, runs: list[Path], out: Path, repeats: int) -> str:
    start = time.perf_counter()
    result = hl.run_report(runs, out=out)
    build = time.perf_counter() - start
    times = load_times(result.path, repeats)
    return (
        f"{label}: {result.n_layers} x {result.n_heads} = {result.n_layers * result.n_heads} "
        f"heads, {len(result.runs)} runs; file {result.size / 1e6:.2f} MB; written in "
        f"{build:.1f} s; load to first heatmap: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}, {repeats} loads)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run directories whose atlas to measure as well")
    p.add_argument("--repeats", type=int, default=5, help="page loads per atlas")
    args = p.parse_args(argv)
    lines = [f"machine: {platform.machine()}, python {platform.python_version()}; "
             f"load average at start {os.getloadavg()[0]:.1f}"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines.append(measure("synthetic 32 x 32", synthetic_runs(root), root / "syn.html",
                             args.repeats))  # fmt: skip
        print(lines[-1], flush=True)
        if args.runs:
            lines.append(measure(", ".join(args.runs), [Path(r) for r in args.runs],
                                 root / "runs.html", args.repeats))  # fmt: skip
            print(lines[-1], flush=True)
    RESULT.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
