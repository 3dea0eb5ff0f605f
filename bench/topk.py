"""Benchmark (not a test): the exact top-k search (``headlab sweep --top-k``) against the full
sweep, in one run.

For each target (python-docs cross-entropy on ``--n-blocks`` x ``--seq-len`` tokens, and the
``names`` task with its logit difference on ``--task-examples`` prompts), zero ablation of every
head of the default model: the search's top ``--k`` against the full sweep's (recall: the share
of the sweep's top k that the search returned), the forward-pass tokens of each (examples x
tokens x heads, plus the clean passes), and the wall and CPU seconds of each. The search runs
first, then the sweep, in the same process; on a shared machine wall seconds drift with the
load, CPU seconds much less, so both are printed.

The full sweep is computed the way ``headlab sweep`` computes it (one clean pass, then every head
of a layer through the engine, layer by layer), keeping each head's per-example changes: they give
the range-assumption check (how often a head's values over all examples span more than the
range factor the search used times their spread on the first round's sample) and, with
``--matrix DIR``, are saved so that ``--replay DIR`` can re-run the racing rule offline on the
same numbers (no model: recall and evaluations of rule variants, e.g. ``--first 2``).

    python bench/topk.py --n-blocks 8 --seq-len 32 --task-examples 16   # a quick look
    nice -n 10 python bench/topk.py --record                             # the README's table
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _full_sweep(prepared, metric: str, batch_size: int):
    """The full sweep (as ``SweepPart`` runs it), returning its tidy table and the per-example
    values ``z [layer * head, example]`` whose means are the sweep's deltas."""
    import pandas as pd

    from headlab.analyses.sweep import COLUMNS, _rows, ablate_each
    from headlab.engine import CleanCache, run_plans
    from headlab.interventions import Plan, Zero
    from headlab.metrics import get_metric

    m = get_metric(metric)
    lay, batch = prepared.layout, prepared.eval
    cache = CleanCache()
    common = dict(batch_size=batch_size, layout=lay, cache=cache)
    clean = run_plans(prepared.model, batch, [Plan()], [m], **common)[0]
    rows, z = [], []
    c = clean[m.name]
    for layer in range(lay.n_layers):
        heads = list(range(lay.n_heads))
        res = ablate_each(prepared.model, batch, Zero(), layer, heads, [m], **common)
        for h, scores in zip(heads, res, strict=True):
            rows.extend(_rows(layer, h, "zero", [m], scores, clean))
            s = scores[m.name]
            tot = _totals(s) - _totals(c)
            z.append(len(batch) * tot / float(_counts(c).sum()))
    return pd.DataFrame(rows, columns=COLUMNS), np.stack(z)


def _totals(scores) -> np.ndarray:
    import torch

    if scores.per_token is not None:
        return torch.nan_to_num(scores.per_token.double()).sum(1).numpy()
    return torch.nan_to_num(scores.per_example.double() * scores.weight.double()).numpy()


def _counts(scores) -> np.ndarray:
    import torch

    if scores.per_token is not None:
        return (~torch.isnan(scores.per_token)).sum(1).double().numpy()
    return torch.where(torch.isnan(scores.per_example), 0.0, scores.weight.double()).numpy()


def _top(keys: np.ndarray, k: int) -> set[int]:
    idx = np.arange(len(keys))
    return set(idx[np.lexsort((idx, -keys))][:k].tolist())


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _range_check(z: np.ndarray, first: int, factor: float, seed: int) -> float:
    """Share of heads whose values over all examples span more than ``factor`` times their
    spread (range plus largest magnitude) on the first ``first`` examples of the search's order:
    how often the uncalibrated assumption behind the bounds fails at round 0."""
    from headlab.analyses.topk import spread

    order = np.random.default_rng(seed).permutation(z.shape[1])
    sample = spread(z[:, order[:first], None])[:, 0]
    return float(np.mean((z.max(1) - z.min(1)) > factor * sample))


def _target(args, name: str, lines: list[str]) -> None:
    import torch

    from headlab.analyses.topk import top_k
    from headlab.jobs.inputs import Inputs, prepare

    task = name if name != "python-docs" else None
    n = args.task_examples if task else args.n_blocks
    prepared = prepare(
        Inputs(model=args.model, data=None if task else name, task=task, n_blocks=n,
               seq_len=None if task else args.seq_len)
    )  # fmt: skip
    metric = prepared.metrics[0]
    batch, lay = prepared.eval, prepared.layout
    torch.manual_seed(0)
    found, s_wall, s_cpu = _timed(
        lambda: top_k(
            prepared.model, batch, k=args.k, methods=["zero"], metrics=[metric],
            confidence=args.confidence, batch_size=args.batch_size, first=args.first,
            leaders=args.leaders, range_factor=args.range_factor,
        )
    )  # fmt: skip
    (full, z), f_wall, f_cpu = _timed(lambda: _full_sweep(prepared, metric, args.batch_size))
    if args.matrix:
        Path(args.matrix).mkdir(parents=True, exist_ok=True)
        np.savez(Path(args.matrix) / f"{name}.npz", z=z, n_layers=lay.n_layers,
                 n_heads=lay.n_heads, seq_len=batch.seq_len)  # fmt: skip
    keys = np.abs(full["delta"].to_numpy())
    truth = _top(keys, args.k)
    t = found.table
    got = {int(i) for i in np.flatnonzero(t["in_top_k"].to_numpy())}
    recall = len(got & truth) / args.k
    gap = np.max(np.abs(z.mean(1) - full["delta"].to_numpy()))
    summary = found.summary[f"zero/{metric}"]
    used = summary["range_factors"].get(str(args.first), args.range_factor)
    s_tok, f_tok = found.cost["search_tokens"], found.cost["sweep_tokens"]
    start = len(lines)
    lines += [
        f"\n{name} ({metric}, {len(batch)} x {batch.seq_len} tokens, zero ablation, "
        f"{lay.n_layers * lay.n_heads} heads, top {args.k}, confidence {args.confidence:g})",
        f"  {'':14}{'recall':>8}{'fwd tokens':>13}{'wall s':>9}{'cpu s':>9}",
        f"  {'full sweep':14}{1:>8.2f}{f_tok:>13.4g}{f_wall:>9.1f}{f_cpu:>9.1f}",
        f"  {'top-k search':14}{recall:>8.2f}{s_tok:>13.4g}{s_wall:>9.1f}{s_cpu:>9.1f}",
        f"  ratio search/sweep: tokens {s_tok / f_tok:.3f}, wall {s_wall / f_wall:.3f}, "
        f"cpu {s_cpu / f_cpu:.3f}",
        f"  decided: {'guaranteed' if summary['guaranteed'] else 'NOT decided'}, by "
        f"{'intervals' if summary['statistical'] else 'exact values only'}; heads by examples "
        f"used: {dict(sorted(t['n'].value_counts().items()))}",
        f"  rounds (heads, evaluations): {summary['rounds']}",
        f"  range factor used per sample size: {summary['range_factors']}; heads whose range "
        f"exceeds it x their round-0 spread: {_range_check(z, args.first, used, 0):.1%} "
        f"(x {args.range_factor:g}: {_range_check(z, args.first, args.range_factor, 0):.1%}); "
        f"max |mean z - sweep delta| {gap:.1e}",
    ]
    for line in lines[start:]:
        print(line, flush=True)


def _replay(args) -> None:
    """The racing rule on saved per-example values, over ``--orders`` seeded example orders: how
    often the answer differs from the full sweep's top k, the mean recall and the mean share of
    the sweep's evaluations (no model, no forward pass)."""
    from headlab.analyses.topk import RaceRule, race_top_k

    for path in sorted(Path(args.replay).glob("*.npz")):
        z = np.load(path)["z"]
        truth = _top(np.abs(z.mean(1)), args.k)
        wrong, recall, cost, used = [], [], [], []
        for seed in range(args.orders):
            rule = RaceRule(
                k=args.k, confidence=args.confidence, first=args.first, leaders=args.leaders,
                range_factor=args.range_factor, seed=seed,
            )  # fmt: skip
            res = race_top_k(lambda h, ex, z=z: z[h][:, ex][..., None], *z.shape, 1, rule)
            got = set(np.flatnonzero(res.selected[:, 0]).tolist())
            wrong.append(got != truth)
            used.append(res.factors.get(args.first, [args.range_factor])[0])
            recall.append(len(got & truth) / args.k)
            cost.append(res.evaluations / z.size)
        print(f"{path.stem} ({z.shape[0]} heads x {z.shape[1]} examples), {args.orders} orders: "
              f"wrong top {args.k} in {np.mean(wrong):.1%}, mean recall {np.mean(recall):.3f}, "
              f"evaluations {np.mean(cost):.3f} of the sweep (min {np.min(cost):.3f}, max "
              f"{np.max(cost):.3f}); round-0 range factor used: median {np.median(used):.2f}, "
              f"min {np.min(used):.2f}; heads whose range exceeds the median factor x their "
              f"round-0 spread: {_range_check(z, args.first, np.median(used), 0):.1%}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-blocks", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--task-examples", type=int, default=32, help="names prompts")
    p.add_argument("--targets", default="python-docs,names")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--first", type=int, default=4, help="examples of round 0")
    p.add_argument("--leaders", type=int, default=None, help="default 2k")
    p.add_argument("--range-factor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--matrix", default=None, help="save per-example values here (npz)")
    p.add_argument("--replay", default=None, help="re-run the rule on a --matrix folder")
    p.add_argument("--orders", type=int, default=200, help="--replay: seeded example orders")
    p.add_argument("--record", action="store_true", help="write bench/last_topk.txt")
    args = p.parse_args()
    if args.replay:
        _replay(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} threads), python {platform.python_version()}; load average at start "
        f"{os.getloadavg()[0]:.1f}",
        "command: python " + " ".join(sys.argv),
    ]
    print("\n".join(lines), flush=True)
    for name in args.targets.split(","):
        _target(args, name.strip(), lines)
    lines.append(f"load average at end {os.getloadavg()[0]:.1f}")
    print(lines[-1])
    if args.record:
        (HERE / "last_topk.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
