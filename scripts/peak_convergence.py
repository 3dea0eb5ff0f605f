"""How many tokens and bins a per-neuron peak needs: the convergence study behind the defaults.

    nice -n 10 python scripts/peak_convergence.py                # capture + study + figure
    python scripts/peak_convergence.py --render-only             # figure + table from table.csv

Runs the default model (SmolLM2-135M) over ``--blocks`` statistics blocks of python-docs (782 x 128
= 100,096 tokens, chosen as a run's ``--n-stats-blocks`` are) and keeps the head outputs (the
``o_proj`` inputs that statistics collect) of ``--per-layer`` random neurons of every layer. For
nested prefixes of those blocks (0.26k, 0.38k, 0.77k, 1.5k ... 100k tokens) and every ``--bins``
it collects statistics with headlab's own :class:`~headlab.stats.StatsCollector` (same warm-up
range, one forward's worth of tokens per update) and reads the histogram peak, the KDE peak at each
``--bandwidths`` and the median with :class:`~headlab.stats.Stats`: what a run gets.

The metric: how far an estimate moves, in units of the neuron's standard deviation, when the data
doubles (prefix ``n`` to prefix ``2n``), as the median and the 90th percentile over neurons; the
last column compares the two disjoint halves of the 100k tokens (each with its own histogram
range). Writes ``runs/peak-convergence/{activations.npy, meta.json, table.csv, timing.json}``, the
figure ``docs/figures/peak_convergence.png`` and the table between the ``<!-- auto:table -->``
fences of ``docs/peak-convergence.md``. Cached activations are reused (``--recapture`` redoes them).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.data.blocks import make_blocks
from headlab.data.corpora import load_texts
from headlab.hooks import capture
from headlab.models.layout import Family, Layout, describe
from headlab.models.load import load_model
from headlab.stats import Stats, StatsCollector, StatsConfig, ThinStatisticsWarning

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "peak-convergence"
FIGURE = ROOT / "docs" / "figures" / "peak_convergence.png"
DOC = ROOT / "docs" / "peak-convergence.md"


def capture_activations(args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """Head outputs of ``per_layer`` random neurons per layer on the statistics blocks:
    ``[tokens, layer * per_layer]`` float32 (tokens in block order), and a description."""
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    layout = describe(model)
    _, stats_batch = make_blocks(
        tokenizer, load_texts(args.data), seq_len=args.seq_len, n_blocks=1,
        n_stats_blocks=args.blocks, seed=args.seed,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    picks = torch.stack(
        [
            torch.randperm(layout.n_units, generator=gen)[: args.per_layer]
            for _ in range(layout.n_layers)
        ]
    )  # [layer, per_layer]
    ids = stats_batch.input_ids  # [block, pos]
    out = np.zeros((ids.numel(), layout.n_layers * args.per_layer), dtype=np.float32)
    rows: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        flat = z.reshape(z.shape[0] * z.shape[1], -1)  # [batch * pos, head * d_head]
        rows[layer] = flat[:, picks[layer]].float()

    with torch.no_grad(), capture(model, keep, layout=layout):
        for start in range(0, ids.shape[0], args.batch_size):
            chunk = ids[start : start + args.batch_size]
            model(input_ids=chunk)
            lo, hi = start * args.seq_len, (start + len(chunk)) * args.seq_len
            for layer in range(layout.n_layers):
                c = slice(layer * args.per_layer, (layer + 1) * args.per_layer)
                out[lo:hi, c] = rows[layer].numpy()
    meta = {
        "model": args.model, "data": args.data, "seq_len": args.seq_len, "blocks": args.blocks,
        "tokens": int(ids.numel()), "seed": args.seed, "per_layer": args.per_layer,
        "n_layers": layout.n_layers, "n_units": layout.n_units,
        "neurons": picks.tolist(), "capture_wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    return out, meta


def study_layout(n_units: int) -> Layout:
    """A one-layer, one-head layout holding every studied neuron (the range, histogram and
    estimators are per neuron, so stacking neurons of different layers changes nothing)."""
    fam = Family("study", ("study",), layers="layers", out_proj="o")
    return Layout(fam, 1, 1, n_units, 1, ("o",), (None,))


def collect(acts: np.ndarray, n_tokens: int, bins: int, chunk: int) -> Stats:
    """headlab's statistics of the first ``n_tokens`` rows of ``acts``, fed ``chunk`` tokens at a
    time (one forward's worth), as a run with ``n_tokens / seq_len`` statistics blocks gets."""
    n_units = acts.shape[1]
    col = StatsCollector(study_layout(n_units), StatsConfig(bins=bins, reservoir=0))
    for start in range(0, n_tokens, chunk):
        x = torch.from_numpy(acts[start : min(start + chunk, n_tokens)])  # [tokens, neuron]
        col.begin_batch(1)
        col.update(0, x[None, :, None, :])  # [batch=1, pos, head=1, d_head=neuron]
    return col.finalize()


def estimates(stats: Stats, bandwidths: list[float]) -> dict[str, np.ndarray]:
    """Every estimator of the study on one set of statistics: name -> ``[neuron]``."""
    out = {"hist": stats.peak("hist")[0, 0].numpy(), "median": stats.median()[0, 0].numpy()}
    for bw in bandwidths:
        out[f"kde:{bw:g}"] = stats.peak("kde", bandwidth=bw)[0, 0].numpy()
    return out


def per_bin_load(stats: Stats) -> np.ndarray:
    """Values per occupied histogram bin of every neuron (the thin-statistics criterion)."""
    hist = stats.tensors["hist"][0].double()  # [neuron, bins]
    return (hist.sum(-1) / (hist > 0).sum(-1).clamp_min(1)).numpy()


def run_study(acts: np.ndarray, meta: dict, args: argparse.Namespace) -> pd.DataFrame:
    """The long table: one row per (bins, estimator, tokens) with movement quantiles in sd."""
    seq, total_blocks = meta["seq_len"], meta["blocks"]
    sizes = sorted({max(1, round(total_blocks / 2**k)) for k in range(args.doublings + 1)})
    sd = acts.std(0).astype(np.float64)  # [neuron] on all tokens
    live = sd > 0
    chunk = args.batch_size * seq
    rows = []
    for bins in args.bins:
        prev: dict[str, np.ndarray] | None = None
        prev_blocks = None
        for blocks in sizes:
            n = blocks * seq
            stats = collect(acts, n, bins, chunk)
            est = estimates(stats, args.bandwidths)
            load = per_bin_load(stats)
            width = stats.bin_width()[0, 0].numpy() / np.where(live, sd, 1.0)
            for name, value in est.items():
                row = {
                    "bins": bins, "estimator": name, "blocks": blocks, "tokens": n,
                    "per_occupied_bin": float(np.median(load)),
                    "bin_width_sd": float(np.median(width[live])),
                }  # fmt: skip
                if prev is not None:
                    move = np.abs(value - prev[name])[live] / sd[live]
                    row.update(
                        from_blocks=prev_blocks,
                        move_p50=float(np.median(move)),
                        move_p90=float(np.quantile(move, 0.9)),
                    )
                rows.append(row)
            prev, prev_blocks = est, blocks
        half = total_blocks // 2 * seq
        a = estimates(collect(acts[:half], half, bins, chunk), args.bandwidths)
        b = estimates(collect(acts[half : 2 * half], half, bins, chunk), args.bandwidths)
        for name in a:
            split = np.abs(a[name] - b[name])[live] / sd[live]
            rows.append(
                {
                    "bins": bins, "estimator": name, "blocks": total_blocks // 2, "tokens": half,
                    "split_half": True, "move_p50": float(np.median(split)),
                    "move_p90": float(np.quantile(split, 0.9)),
                }
            )  # fmt: skip
        print(f"bins {bins} done", flush=True)
    table = pd.DataFrame(rows)
    table["split_half"] = table.get("split_half", False).fillna(False).astype(bool)
    return table


#: the rows the document shows: every histogram, every KDE bandwidth and the median at 1000 bins,
#: and the default KDE at coarser bins (the full table is ``runs/peak-convergence/table.csv``)
SHOWN = [("hist", None), ("kde:", 1000), ("kde:0.1", None), ("median", 1000)]
FLOOR = 0.004  # "did not move" on the log axis


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    keep = np.zeros(len(table), dtype=bool)
    for est, bins in SHOWN:
        hit = table.estimator.str.startswith(est) if est.endswith(":") else table.estimator == est
        keep |= hit & (table.bins == bins if bins is not None else True)
    return table[keep]


def plot(table: pd.DataFrame, path: Path, stable: float, thin: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[~table.split_half & table.move_p50.notna()]
    kdes = sorted({e for e in t.estimator if e.startswith("kde")}, key=lambda e: float(e[4:]))
    fine = t.bins.max()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    panels = [
        ("peak:hist (fullest bin)", [(f"{b} bins", "hist", b) for b in sorted(t.bins.unique())]),
        (f"peak:kde, {fine} bins", [(f"bw {e[4:]} sd", e, fine) for e in kdes]),
        (
            "median and the two peaks",
            [("median", "median", fine), ("peak (kde 0.1)", "kde:0.1", fine),
             ("peak:hist", "hist", fine)],
        ),
    ]  # fmt: skip
    for ax, (title, groups) in zip(axes, panels, strict=True):
        for label, est, bins in groups:
            g = t[(t.estimator == est) & (t.bins == bins)]
            (line,) = ax.plot(g.tokens, g.move_p90.clip(lower=FLOOR), "o-", label=label)
            ax.plot(g.tokens, g.move_p50.clip(lower=FLOOR), "--", color=line.get_color(), lw=1)
        ax.axhline(stable, color="k", lw=0.8, ls="--")
        ax.axhline(thin, color="k", lw=0.8, ls=":")
        ax.text(300, stable * 1.05, "stable", fontsize=8)
        ax.text(300, thin * 1.05, "warn below", fontsize=8)
        ax.set(xscale="log", yscale="log", title=title, xlabel="tokens after doubling")
        ax.legend(title="solid: p90, dashed: median", fontsize=8, title_fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"move when the data doubles (neuron sd; < {FLOOR}: none)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _k(tokens: float) -> str:
    return f"{tokens / 1000:.1f}k"


def markdown(table: pd.DataFrame) -> str:
    """p90 / median movement (sd) on doubling: one row per (estimator, bins), one column per
    size after doubling; then the split halves and the histogram's values per occupied bin."""
    t = _shown(table[~table.split_half & table.move_p50.notna()]).copy()
    t["cell"] = [f"{b:.3f} / {a:.3f}" for a, b in zip(t.move_p50, t.move_p90, strict=True)]
    wide = t.pivot_table(
        index=["estimator", "bins"], columns="tokens", values="cell", aggfunc="first"
    )
    s = table[table.split_half].set_index(["estimator", "bins"])
    wide["50k vs other 50k"] = [
        f"{s.loc[i].move_p90:.3f} / {s.loc[i].move_p50:.3f}" for i in wide.index
    ]
    head = ["estimator", "bins", *[_k(c) if not isinstance(c, str) else c for c in wide.columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (est, bins), r in wide.iterrows():
        name = "peak:hist" if est == "hist" else "median" if est == "median" else f"peak:{est}"
        lines.append(f"| {name} | {bins} | " + " | ".join(str(v) for v in r.values) + " |")
    occ = table[(table.estimator == "hist") & ~table.split_half].pivot_table(
        index="bins", columns="tokens", values="per_occupied_bin"
    )
    lines += ["", "Values per occupied histogram bin (median over neurons):", ""]
    lines += ["| bins | " + " | ".join(_k(c) for c in occ.columns) + " |"]
    lines += ["|" + "---|" * (len(occ.columns) + 1)]
    for b, r in occ.iterrows():
        lines.append(f"| {b} | " + " | ".join(f"{v:.1f}" for v in r.values) + " |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    if not DOC.is_file():
        return
    doc = DOC.read_text()
    new = re.sub(
        r"(<!-- auto:table -->\n).*?(<!-- /auto:table -->)",
        lambda m: m.group(1) + text + "\n" + m.group(2), doc, flags=re.S,
    )  # fmt: skip
    DOC.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="python-docs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--blocks", type=int, default=782, help="statistics blocks (782 x 128 >= 100k)")
    p.add_argument("--per-layer", type=int, default=40, help="random neurons kept per layer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doublings", type=int, default=9, help="prefix sizes: blocks / 2**k")
    p.add_argument("--bins", type=_ints, default=[50, 100, 200, 500, 1000])
    p.add_argument("--bandwidths", type=_floats, default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--stable", type=float, default=0.05, help="stable: p90 moves less (sd)")
    p.add_argument("--thin", type=float, default=0.1, help="too thin: p90 moves more (sd)")
    p.add_argument("--recapture", action="store_true", help="redo the activations")
    p.add_argument("--render-only", action="store_true", help="figure + table from table.csv")
    args = p.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", ThinStatisticsWarning)  # the study sizes are thin on purpose
    CACHE.mkdir(parents=True, exist_ok=True)
    npy, js, csv, timing = (
        CACHE / n for n in ("activations.npy", "meta.json", "table.csv", "timing.json")
    )
    if not args.render_only:
        if args.recapture or not npy.is_file():
            acts, meta = capture_activations(args)
            np.save(npy, acts)
            js.write_text(json.dumps(meta))
            print(f"captured {acts.shape} in {meta['capture_wall_s']} s", flush=True)
        acts = np.load(npy)  # [tokens, neuron] float32
        t0 = time.perf_counter()
        table = run_study(acts, json.loads(js.read_text()), args)
        timing.write_text(json.dumps({"study_wall_s": round(time.perf_counter() - t0, 1)}))
        table.to_csv(csv, index=False)
    meta, table = json.loads(js.read_text()), pd.read_csv(csv)
    plot(table, FIGURE, args.stable, args.thin)
    study_s = json.loads(timing.read_text())["study_wall_s"] if timing.is_file() else float("nan")
    n_neurons = meta["per_layer"] * meta["n_layers"]
    text = markdown(table) + (
        f"\n\n{n_neurons} neurons ({meta['per_layer']} per layer x {meta['n_layers']} layers) "
        f"of {meta['model']} on {meta['tokens']:,} {meta['data']} tokens; wall time: capture "
        f"{meta['capture_wall_s']:.0f} s, study {study_s:.0f} s (2 CPU cores shared with other "
        "jobs)."
    )
    write_doc(text)
    print(text)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
