"""Regenerate ``docs/findings.md`` from runs on the default model, in one command.

    python scripts/findings.py            # or: make findings

Runs every analysis the findings cite (``headlab sweep``, ``prune``, ``shift``, ``detect``,
``cascade``, ``compare``, ``attention``, ``gate``, ``steer``, on three models) into
``runs/findings/<name>`` at sizes that can decide the claims — each command resumes, so a finished
run costs only a reload and an interrupted one continues — then computes the per-example checks
that give single curves an interval (``runs/findings/checks``), copies the figures into
``docs/figures/`` and rewrites every block of ``docs/findings.md`` fenced by
``<!-- auto:NAME -->`` ... ``<!-- /auto:NAME -->`` with tables and verdicts decided by one rule
(``findings_rule.py``). Prose outside the fences is kept. A section whose decisive run is missing
keeps its previous small-run verdict, marked as not re-run. ``--render-only`` skips the runs;
``--only a,b`` limits runs and blocks; ``--runs-only`` skips the rendering; ``--with-gates`` also
runs the long ``l0`` job (no claim rests on it). Wall times of the runs accumulate in
``runs/findings/times.json`` (a resumed run adds the time of each call that did work).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import findings_checks as checks
import findings_sections as sections
import findings_steer
import pandas as pd
from findings_rule import RULE

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "findings"
DOC = ROOT / "docs" / "findings.md"
FIGURES = ROOT / "docs" / "figures"
TIMES = RUNS / "times.json"
SWEEP = "runs/findings/sweep-docs"  # relative: commands run from the repository root
#: the ranking blocks: seed 0, 8 × 128 tokens (the ranking only needs an order of the heads)
RANK = ["--data", "python-docs", "--seq-len", "128", "--n-blocks", "8", "--seed", "0"]
#: the evaluation blocks: seed 2, 32 × 128 tokens, none of them among the ranking blocks
#: (checked by ``check_held_out``), statistics from the next 800 blocks (102,400 tokens)
EVAL = ["--data", "python-docs", "--seq-len", "128", "--n-blocks", "32", "--seed", "2",
        "--n-stats-blocks", "800", "--bins", "1000"]  # fmt: skip
METHODS = "zero,mean,median,peak:hist,peak:kde,resample"  # peak:kde is plain `peak`
TASK = ["--n-blocks", "32", "--n-stats-blocks", "32"]
PROMPT = "When Mary and John went to the store, John gave a drink to"
MACHINE = ("one 2-core x86-64 CPU (24 GiB; PyTorch CPU build, fp32, 2 threads); the runs went one "
           "at a time, except that detect, the digits runs and the first parts of the minilm runs "
           "shared the machine with up to five other jobs, steer-colours-pursuit, "
           "steer-colours-chg, minilm-prune-neurons and attention ran two at a time, and "
           "steer-numbers-pursuit shared it with the test suite for most of its run")  # fmt: skip


def _pool() -> str:
    """Cascade candidates: the detector's top-20 induction and top-10 previous-token heads."""
    t = pd.read_parquet(RUNS / "detect" / "results.parquet")
    heads = []
    for metric, k in (("induction_diag", 20), ("previous_token_diag", 10)):
        g = t[t["metric"] == metric].sort_values("value", ascending=False, kind="stable")
        heads += [f"{r.layer}.{r.head}" for r in g.head(k).itertuples()]
    return ",".join(heads)


#: (run name, arguments after ``headlab``, forward passes of 4k tokens it costs, roughly)
# fmt: off
STEPS: list[tuple[str, Callable[[], list[str]], int]] = [
    ("sweep-docs", lambda: ["sweep", *RANK, "--n-stats-blocks", "16", "--method", "zero",
                            "--metric", "ce,top1"], 40),
    ("prune-neurons", lambda: [
        "prune", *EVAL, "--unit", "neuron", "--order", "random", "--seeds", "0,1,2",
        "--method", METHODS, "--fractions", "0.5,1", "--metric", "ce,top1",
        "--tolerance", "0.1"], 60),
    ("prune-heads", lambda: [
        "prune", *EVAL, "--sweep", SWEEP, "--order", "random,sweep", "--seeds", "0,1,2",
        "--method", "zero", "--fractions", "0.1,0.3,0.5,0.7,1", "--metric", "ce,top1",
        "--tolerance", "0.1"], 24),
    ("prune-head-methods", lambda: [
        "prune", *EVAL, "--order", "random", "--seeds", "0,1,2",
        "--method", METHODS, "--fractions", "0.3,0.5,1",
        "--metric", "ce,top1", "--tolerance", "0.1"], 70),
    ("shift", lambda: ["shift", *EVAL, "--sweep", SWEEP, "--top-k", "5"], 30),
    ("compare", lambda: ["compare", "--data", "python-docs", "--seq-len", "64", "--n-blocks",
                         "32", "--methods", "zero"], 140),
    ("detect", lambda: ["detect", "--task", "induction", "--n-blocks", "32"], 2),
    ("attention", lambda: ["attention", "--task", "names", *TASK, "--prompt", PROMPT,
                           "--heads", "24.4,23.3"], 35),
    ("attention-induction", lambda: ["attention", "--task", "induction", *TASK, "--seq-len", "33"],
     70),
    ("cascade", lambda: ["cascade", "--task", "induction", *TASK, "--heads", _pool(),
                         "--steps", "5", "--share", "0.15"], 80),
    ("gate", lambda: ["gate", "--task", "induction", "--seq-len", "33", "--n-blocks", "32",
                      "--n-stats-blocks", "64", "--steps", "100", "--masks", "3",
                      "--batch-size", "16", "--validate", "--k", "10", "--random", "20"], 700),
]
#: the encoder and the vision transformer (issue 16 item 4; sizes chosen with their author)
TEN = ",".join(f"{i / 10:g}" for i in range(1, 11))
DIGITS = ["--model", "digits-vit", "--data", "digits", "--n-blocks", "450", "--n-stats-blocks",
          "1347", "--bins", "200", "--batch-size", "450"]
MINILM = ["--model", "minilm", "--data", "python-docs", "--seq-len", "128", "--n-stats-blocks",
          "800", "--bins", "1000"]
MODEL_STEPS: list[tuple[str, Callable[[], list[str]], int]] = [
    ("digits-prune-heads", lambda: [
        "prune", *DIGITS, "--unit", "head", "--order", "random", "--seeds", "0,1,2,3,4,5,6,7,8,9",
        "--method", METHODS, "--fractions", TEN, "--tolerance", "0.1"], 0),
    ("digits-prune-neurons", lambda: [
        "prune", *DIGITS, "--unit", "neuron", "--order", "random", "--seeds",
        "0,1,2,3,4,5,6,7,8,9", "--method", METHODS, "--fractions", TEN, "--tolerance", "0.1"], 0),
    ("minilm-sweep", lambda: ["sweep", *MINILM, "--n-blocks", "16", "--seed", "0", "--method",
                              METHODS], 0),
    ("minilm-prune-heads", lambda: [
        "prune", *MINILM, "--n-blocks", "32", "--seed", "2", "--unit", "head", "--order",
        "random,sweep", "--sweep", "runs/findings/minilm-sweep", "--seeds", "0,1,2,3,4,5,6,7,8,9",
        "--method", METHODS, "--fractions", TEN, "--tolerance", "0.05"], 0),
    ("minilm-prune-neurons", lambda: [
        "prune", *MINILM, "--n-blocks", "32", "--seed", "2", "--unit", "neuron", "--order",
        "random", "--seeds", "0,1,2,3,4", "--method", METHODS, "--fractions", TEN,
        "--tolerance", "0.05"], 0),
]
#: steering: inputs written from templates, contrastive gate fits (CHG selection), 6 steer runs
STEER_INPUTS = "runs/findings/steer-inputs"
STEER_STEPS = findings_steer.steps(RUNS, STEER_INPUTS)
GATE_STEPS: list[tuple[str, Callable[[], list[str]], int]] = [
    ("l0", lambda: ["l0", "--task", "induction", "--seq-len", "33", "--n-blocks", "8"], 300),
]
# fmt: on
#: figure in a run directory -> name under docs/figures
FIGURE_COPIES = {
    "prune-heads/prune.png": "prune_heads.png",
    "prune-neurons/prune.png": "prune_neurons.png",
    "shift/shift.png": "shift.png",
    "detect/detect.png": "detect_smollm2.png",
    "cascade/cascade.png": "cascade.png",
    "compare/compare.png": "compare_smollm2.png",
    "attention/faithfulness.png": "attention_faithfulness_names.png",
    "attention-induction/faithfulness.png": "attention_faithfulness_induction.png",
    "attention/attention_grid.png": "attention_grid_names.png",
    "attention/head_L24_H4.png": "attention_head_L24_H4.png",
    "attention/head_L23_H3.png": "attention_head_L23_H3.png",
    "attention/rollout.png": "attention_rollout_names.png",
    "gate/labels.png": "gate_labels_smollm2.png",
    "l0/tradeoff.png": "l0_tradeoff_smollm2.png",
}

#: claim key -> (claim, the previous verdict with its numbers and sizes). The previous runs:
#: 4 evaluation blocks × 48 tokens and 8 statistics blocks × 48 tokens (corpus), 8 or 16
#: examples (tasks), 20 prompts × 1 sample (steering).
PREVIOUS: dict[str, tuple[str, str, str]] = {
    "sweep": (
        "importance is concentrated / power-law",
        "agrees",
        "top-10 share 42 %, slope −0.87 (4 × 48 tokens, no interval)",
    ),
    "order": (
        "importance order beats random order",
        "agrees (prose)",
        "held-out order beats random by 2.7 nats at 40 % (one seed pair)",
    ),
    "removable": (
        "70–90 % of heads are removable (ΔCE ≤ 0.1)",
        "disagrees",
        "40 % in sample, 10 % held out (4 × 48 tokens)",
    ),
    "head-peak": (
        "peak ablation degrades least (heads)",
        "not stated",
        "random order: mean < peak < resample < zero (2 seeds)",
    ),
    "head-resample": ("resampling hurts most (heads)", "not stated", "zero hurt most (2 seeds)"),
    "neuron-peak": (
        "peak ablation degrades least (neurons)",
        "disagrees",
        "mean < peak < resample < zero; peak from 384 values per neuron in 1000 bins (2 seeds)",
    ),
    "neuron-resample": ("resampling hurts most (neurons)", "disagrees", "zero hurt most"),
    "shift": (
        "zero ablation is the off-distribution method",
        "agrees",
        "outlier rate 3.0× clean vs ≤ 1.2× (4 × 48 tokens, no interval)",
    ),
    "compare": (
        "ablation > rollout > gradient in mean ρ (the review's ordering)",
        "agrees",
        "0.44 / 0.40 / 0.31 (4 examples)",
    ),
    "attention": (
        "attention is plausible but not faithful (ρ < 0.5)",
        "agrees",
        "ρ 0.22 (16 names) and 0.20 (8 induction)",
    ),
    "cascade": (
        "backup heads appear only after removal",
        "agrees (prose)",
        "3 backups at 19–24 % of the trigger's effect (8 examples)",
    ),
    "steer": (
        "rescaling a few concept heads controls the concept, unlike random heads",
        "disagrees",
        "5 of 20 conditions (20 prompts × 1 sample)",
    ),
    **{
        f"{m}-{u}-{c}": (f"{claim} ({what}, {u}s)", "—", "new model")
        for m, what in (("minilm", "all-MiniLM-L6-v2 encoder"), ("digits", "digits ViT"))
        for u in ("head", "neuron")
        for c, claim in (
            ("peak", "peak ablation degrades least"),
            ("resample", "resampling hurts most"),
        )
    },
    "gate": (
        "CHG labels are causal (facilitating heads hurt more than random ones)",
        "agrees (prose)",
        "k = 10: +5.55 vs random +1.11 ± 0.98 (in-sample: the 8 fitting sequences)",
    ),
    "gate-interfering": (
        "zeroing interfering heads helps (ΔCE < 0)",
        "not stated",
        "k = 5: −0.38, k = 10: +0.15 (in-sample: the 8 fitting sequences)",
    ),
}
#: the claims each block decides (for the not-re-run notice and the summary)
BLOCK_CLAIMS = {
    "sweep": ["sweep"], "prune-heads": ["order", "removable"],
    "prune-head-methods": ["head-peak", "head-resample"],
    "prune-neurons": ["neuron-peak", "neuron-resample"], "shift": ["shift"],
    "compare": ["compare"], "attention": ["attention"], "cascade": ["cascade"], "detect": [],
    "minilm": [f"minilm-{u}-{c}" for u in ("head", "neuron") for c in ("peak", "resample")],
    "digits": [f"digits-{u}-{c}" for u in ("head", "neuron") for c in ("peak", "resample")],
    "steer": ["steer"], "gate": ["gate", "gate-interfering"],
}  # fmt: skip
#: the runs each block needs
BLOCK_RUNS = {
    "sweep": ["compare"], "prune-heads": ["sweep-docs", "prune-heads"],
    "prune-head-methods": ["prune-head-methods"], "prune-neurons": ["prune-neurons"],
    "shift": ["sweep-docs", "shift"], "compare": ["compare"],
    "attention": ["attention", "attention-induction"], "cascade": ["detect", "cascade"],
    "detect": ["detect"],
    "minilm": ["minilm-sweep", "minilm-prune-heads", "minilm-prune-neurons"],
    "digits": ["digits-prune-heads", "digits-prune-neurons"],
    "steer": [n for n, _, _ in STEER_STEPS], "gate": ["gate"],
}  # fmt: skip


# --- runs --------------------------------------------------------------------------------------


def _complete(name: str) -> bool:
    checks.RUNS = RUNS
    return checks.complete(name)


def record_time(name: str, seconds: float) -> None:
    """Add ``seconds`` of work to run ``name`` in ``times.json``."""
    times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    times[name] = round(times.get(name, 0.0) + seconds, 1)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


def run_steps(steps: list[tuple[str, Callable[[], list[str]], int]]) -> list[str]:
    from headlab.cli.app import main

    os.chdir(ROOT)
    failed = []
    for name, argv, _ in steps:
        args = [*argv(), "--out", f"runs/findings/{name}", "--quiet"]
        done = _complete(name)
        start = time.perf_counter()
        print(f"findings: headlab {' '.join(args)}", file=sys.stderr, flush=True)
        saved, sys.argv = sys.argv, ["headlab", *args]  # the manifest records sys.argv
        try:
            rc = main(args)
            if rc != 0 and not _complete(name):  # prune exits 2 on a complete run when nothing
                failed.append(name)  # is removable within the tolerance: a finding, not a failure
        finally:
            sys.argv = saved
        took = time.perf_counter() - start
        if not done:
            record_time(name, took)
        print(f"findings: {name} {took:.0f} s", file=sys.stderr)
    return failed


# --- the document ------------------------------------------------------------------------------


def update_doc(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """Replace each fenced auto block that has a rendering; returns the text and the names done."""
    done = []
    for name, body in blocks.items():
        pattern = re.compile(  # an empty block is two adjacent fence lines
            rf"(<!-- auto:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /auto:{re.escape(name)} -->)",
            re.S,
        )
        text, n = pattern.subn(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
        if n:
            done.append(name)
    return text, done


def _cost(names: list[str]) -> str:
    steps = {n: (argv, cost) for n, argv, cost in STEPS + MODEL_STEPS + STEER_STEPS}
    cmds = []
    for n in names:
        if n in steps and not _complete(n):
            try:
                cmd = shlex.join(["headlab", *steps[n][0](), "--out", f"runs/findings/{n}"])
            except FileNotFoundError:  # needs an earlier run (the detector's or a gate's heads)
                cmd = f"headlab {n} … (after the run it takes heads from) --out runs/findings/{n}"
            cost = steps[n][1]
            cmds.append(f"`{cmd}`" + (f" (~{cost} forward passes of SmolLM2-135M on 32 × 128 "
                                      "tokens)" if cost else ""))  # fmt: skip
    return "; ".join(cmds)


def not_rerun(block: str) -> str:
    """The notice of a block whose decisive run is missing, with the previous verdicts."""
    lines = [
        f"**Not re-run at decisive size** (no CPU time left for it in this regeneration); "
        f"what would decide it: {_cost(BLOCK_RUNS[block])}, all in `make findings`."
    ]
    for key in BLOCK_CLAIMS[block]:
        claim, before, nums = PREVIOUS[key]
        if before == "—":
            lines.append(f'- "{claim}": not run before; not decided.')
            continue
        lines.append(f"- \"{claim}\": previous small-run verdict *{before}* ({nums}) — not "
                     "decided.")  # fmt: skip
    return "\n".join(lines)


def summary(verdicts: dict[str, sections.Verdict]) -> str:
    rows = []
    for key, (claim, before, nums) in PREVIOUS.items():
        v = verdicts.get(key)
        if v is None:
            after = "not run yet" if before == "—" else "not re-run at decisive size"
            changed = "—"
        else:
            after = f"**{v.verdict}** ({v.numbers})"
            old = before.split(" ")[0]
            if old == "—":
                changed = "new"
            elif old == v.verdict:
                changed = "no"
            else:
                changed = "reversed" if {old, v.verdict} == {"agrees", "disagrees"} else "yes"
        rows.append([claim, f"{before}: {nums}" if before != "—" else "— (new model)", after,
                     changed])  # fmt: skip
    return sections.table(["claim", "before: small runs", "after: decisive runs", "changed"],
                          rows)  # fmt: skip


def machine() -> str:
    times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    total = sum(times.values())
    worked = sorted(((n, v) for n, v in times.items() if v >= 30), key=lambda x: -x[1])
    per = ", ".join(f"{n} {v / 60:.0f} min" for n, v in worked)
    return (f"Machine: {MACHINE}. Total wall time of the runs below: **{total / 3600:.1f} h** "
            f"({per or 'none yet'}); the times of runs that shared the machine are inflated "
            "several-fold.\n\n"
            + RULE)  # fmt: skip


def orders_figure() -> None:
    """docs/figures/prune_orders.png: ΔCE against fraction of heads, zero ablation, per order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = sections.read("prune-heads")
    if t is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for label, order in (("random (mean ± sd of 3 seeds)", "random"),
                         ("importance order, ranked on other blocks", "sweep")):  # fmt: skip
        for method, style in (("zero", "-"), ("mean", "--")):
            c = sections._curve(t, order, method)
            if c.empty:
                continue
            m, sd = c.mean(), c.std(ddof=1) if len(c) > 1 else None
            line = ax.plot(c.columns, m, style, marker="o", ms=3, label=f"{label}, {method}")
            if sd is not None:
                ax.fill_between(c.columns, m - sd, m + sd, alpha=0.2, color=line[0].get_color())
    ax.axhline(0.1, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="fraction of heads ablated", ylabel="ΔCE (nats)", title="pruning orders")
    ax.legend(fontsize=7)
    fig.savefig(FIGURES / "prune_orders.png", dpi=110)
    plt.close(fig)


def atlas() -> str:
    """``runs/findings/atlas.html``, the head atlas of every finished run of the default model
    (``headlab report``), and its screenshot ``docs/figures/findings_atlas.png`` (with Debian's
    chromium and selenium; skipped without them). Returns the block that links them."""
    names = [n for n, _, _ in STEPS + GATE_STEPS if _complete(n)]  # the default model's
    if not names:
        return "The head atlas of the runs is written once a run has finished."
    from headlab.jobs.report import run_report

    res = run_report([RUNS / n for n in names], out=RUNS / "atlas.html")
    shot = FIGURES / "findings_atlas.png"
    try:
        _screenshot(res.path, shot)
    except Exception as err:  # no browser here: keep the previous screenshot, if any
        print(f"findings: no atlas screenshot ({type(err).__name__}: {err})", file=sys.stderr)
    runs = ", ".join(f"`{n}`" for n in res.runs)
    body = (f"`headlab report {' '.join(f'runs/findings/{n}' for n in names)} --out "
            f"runs/findings/atlas.html` — one page of every head across the runs ({runs}); open "
            "it in a browser (no network needed).")  # fmt: skip
    return body + ("\n\n![head atlas](figures/findings_atlas.png)" if shot.is_file() else "")


def _screenshot(page: Path, out: Path) -> None:
    from headlab.atlas.browser import headless_chromium

    driver = headless_chromium()
    try:
        driver.get(page.resolve().as_uri())
        time.sleep(5)  # let the plots draw
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def render(only: set[str] | None) -> None:
    sections.RUNS = RUNS
    for src, dst in FIGURE_COPIES.items():
        if (RUNS / src).is_file():
            shutil.copyfile(RUNS / src, FIGURES / dst)
    orders_figure()
    blocks, verdicts = {}, {}
    for name, fn in sections.RENDERERS.items():
        if only is not None and name not in only:
            continue
        r = fn()
        blocks[name] = r.body if r is not None else not_rerun(name)
        for v in r.verdicts if r is not None else []:
            verdicts[v.key] = v
    if only is None:
        blocks["summary"], blocks["machine"] = summary(verdicts), machine()
        blocks["atlas"] = atlas()
    text, done = update_doc(DOC.read_text(), blocks)
    DOC.write_text(text)
    missing = sorted(set(blocks) - set(done))
    print(f"findings: rewrote {len(done)} blocks of {DOC.relative_to(ROOT)}"
          + (f"; no fence for: {', '.join(missing)}" if missing else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--render-only", action="store_true", help="do not run, only re-render")
    p.add_argument("--runs-only", action="store_true", help="run, do not render")
    p.add_argument("--only", default=None, help="comma-separated run/section names")
    p.add_argument("--with-gates", action="store_true", help="also run l0 (long)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if not args.render_only:
        findings_steer.write_inputs(ROOT / STEER_INPUTS)
        steps = STEPS + MODEL_STEPS + STEER_STEPS + (GATE_STEPS if args.with_gates else [])
        failed = run_steps([s for s in steps if only is None or s[0] in only])
        if failed:
            print(f"findings: failed runs: {', '.join(failed)}", file=sys.stderr)
    if args.runs_only:
        return 0
    checks.RUNS = RUNS
    checks.check_held_out()
    checks.check_prune_heads()
    checks.check_shift()
    checks.check_cascade()
    checks.check_gate()
    for name, _, _ in STEER_STEPS:
        if name.startswith("steer-"):
            checks.check_steer_cost(name)
    render(only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
