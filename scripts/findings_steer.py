"""The steering section of ``docs/findings.md``: its inputs, runs and verdict.

The claim (the review's): rescaling a few concept heads controls the concept (α = −1 removes its
words, α = 5 saturates them), unlike rescaling random heads. Tested per concept (``colours``,
``numbers``) with three head selections of k = 3 heads — Head Pursuit, the concept-mass sweep, and
CHG: the most forget-specific heads of a contrastive ``headlab gate`` fit that keeps neutral
sentences and forgets the same sentences ending in a concept word — on 100 held-out prompts,
each sampled 3 times (the prompt file lists every prompt three times; samples are paired across
conditions, which use the same seeds).

The inputs are written by :func:`write_inputs` from templates (frames × objects) so they are
reproducible and contain none of the concept's words; the selection prompts are the concepts'
built-in ones, disjoint from these.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from findings_rule import Claim, bootstrap_interval, combine, t_interval

#: (run name, arguments after ``headlab``, rough cost) — filled by :func:`steps`
Step = tuple[str, Callable[[], list[str]], int]

CONCEPTS = ("colours", "numbers")
SELECTIONS = ("pursuit", "sweep", "chg")
SAMPLES = 3  # samples per held-out prompt
K = 3  # heads per selection
REMOVE, AMPLIFY = -1.0, 5.0  # the review's alphas
MAX_COST = 0.5  # nats of corpus CE the steered heads may cost at those alphas

_OBJECTS = {
    "colours": ("door", "bicycle", "umbrella", "sweater", "kite", "mug", "tent", "notebook",
                "balloon", "jacket", "sofa", "bus", "backpack", "tablecloth", "parrot", "candle",
                "roof", "ribbon", "scooter", "teapot"),
    "numbers": ("chairs", "books", "apples", "windows", "students", "cars", "trees", "cookies",
                "pencils", "boats", "houses", "birds", "coins", "candles", "tickets", "bottles",
                "horses", "shirts", "lamps", "stamps"),
}  # fmt: skip
_FRAMES = {
    "colours": ("The {} in the shop window was",
                "She bought a new {}, and it was",
                "Everyone noticed that the {} had been painted",
                "Over the years the old {} had faded to a dull",
                "He pointed at the {} and said that its colour was"),
    "numbers": ("When we counted the {}, there were",
                "The teacher asked how many {} were left, and the answer was",
                "She opened the box of {} and found",
                "Last month the store ordered more {}; the order was for",
                "He lined up the {} in rows of"),
}  # fmt: skip
#: the gate's sentences: a frame and a noun, ending in a concept word (forget) or a neutral one
# fmt: off
_GATE_NOUNS = ("car", "house", "shirt", "flower", "wall", "hat", "boat", "chair", "cup", "box",
               "bag", "dress", "fence", "bird", "lamp", "book", "ball", "shoe", "pen", "towel")
# fmt: on
# fmt: off
_GATE = {  # frames, concept words, neutral words
    "colours": (("The {} was", "I think the {} is", "They wanted the {} to be"),
                ("red", "green", "blue", "yellow", "black", "white", "pink", "brown", "grey",
                 "orange", "purple", "gold"),
                ("new", "old", "clean", "small", "large", "cheap", "heavy", "empty", "broken",
                 "quiet", "useful", "soft")),
    "numbers": (("There were {} on the table:", "She said the {} numbered", "We counted the {}:"),
                ("two", "three", "four", "five", "six", "seven", "ten", "twelve", "twenty",
                 "3", "5", "8"),
                ("some", "many", "few", "several", "plenty", "none", "lots", "enough", "dozens",
                 "most", "all", "half")),
}
# fmt: on


def prompts(concept: str) -> list[str]:
    """The 100 held-out prompts of ``concept`` (20 objects × 5 frames)."""
    return [f.format(o) for f, o in itertools.product(_FRAMES[concept], _OBJECTS[concept])]


def gate_sentences(concept: str, which: str) -> list[str]:
    """Sentences ending in a concept word (``which="concept"``) or a neutral word (``"neutral"``),
    the same frames and nouns in the same order."""
    frames, concept_words, neutral = _GATE[concept]
    words = concept_words if which == "concept" else neutral
    nouns = [n + ("es" if n[-1] in "sx" else "s") if concept == "numbers" else n
             for n in _GATE_NOUNS]  # fmt: skip
    return [f"{f.format(n)} {w}." for f, n, w in itertools.product(frames, nouns, words)]


def write_inputs(folder: Path) -> None:
    """``<concept>-prompts.txt`` (each prompt ``SAMPLES`` times), ``<concept>-concept.txt`` and
    ``<concept>-neutral.txt`` (the gate's forget and retain sentences) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for c in CONCEPTS:
        lines = [p for p in prompts(c) for _ in range(SAMPLES)]
        _write(folder / f"{c}-prompts.txt", lines)
        for which in ("concept", "neutral"):
            _write(folder / f"{c}-{which}.txt", gate_sentences(c, which))


def _write(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def chg_heads(runs: Path, concept: str) -> str:
    """The ``K`` most forget-specific heads of the concept's contrastive gate fit (``L.H,...``)."""
    t = pd.read_csv(runs / f"gate-{concept}" / "heads.csv")
    t = t.sort_values(["forget_score", "layer", "head"], ascending=[False, True, True],
                      kind="stable")  # fmt: skip
    return ",".join(f"{int(r.layer)}.{int(r.head)}" for r in t.head(K).itertuples())


#: gate masks fitted in parallel: the official trainer fits one; colours ran with the CLI's default
#: of two before the CPU time of this regeneration ran short
_MASKS = {"colours": "2", "numbers": "1"}


def _selection(runs: Path, concept: str, sel: str) -> list[str]:
    """The head-selection arguments (CHG: the heads of the finished gate fit, read when the step
    runs)."""
    if sel == "chg":
        return ["--select", "heads", "--heads", chg_heads(runs, concept)]
    return ["--select", sel]


def steps(runs: Path, inputs: str) -> list[Step]:
    """The gate fits and steering runs, ``inputs`` the folder of :func:`write_inputs` (relative
    to the repository root, as the commands are recorded)."""
    out: list[Step] = []
    common = ["--k", str(K), "--n-random", "3", f"--alphas={REMOVE:g},0,{AMPLIFY:g}",
              "--max-new-tokens", "16", "--gen-batch-size", "32", "--n-blocks", "32"]  # fmt: skip
    for c in CONCEPTS:
        out.append((f"gate-{c}", lambda c=c: [
            "gate", "--data", f"{inputs}/{c}-neutral.txt", "--forget-data",
            f"{inputs}/{c}-concept.txt", "--seq-len", "16", "--n-blocks", "32",
            "--n-stats-blocks", "1", "--steps", "100", "--masks", _MASKS[c], "--validate",
            "--k", str(K), "--random", "20"], 10))  # fmt: skip
        for sel in SELECTIONS:
            out.append((f"steer-{c}-{sel}", lambda c=c, sel=sel: [
                "steer", "--concept", c, "--prompts", f"{inputs}/{c}-prompts.txt",
                *_selection(runs, c, sel), *common], 60))  # fmt: skip
    return out


# --- the section -------------------------------------------------------------------------------


def word_counts(gens: pd.DataFrame, words: list[str]) -> pd.DataFrame:
    """``gens`` with ``hits`` (concept words) and ``words`` (all words) per sample, counted by
    headlab's own :func:`concept_counts` (the counts behind the run's ``concept_rate``)."""
    from headlab.analyses.steer.concepts import concept_counts

    counts = concept_counts(list(gens["text"]), words)
    return gens.assign(hits=[k for k, _ in counts], words=[n for _, n in counts])


def _per_prompt(gens: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concept words and all words per (prompt, condition), summed over the prompt's samples."""
    rows = zip(gens["selection"], gens["seed"], gens["alpha"], strict=True)
    cond = [f"{sel}:{'' if pd.isna(seed) else int(seed)}:{float(a):g}" for sel, seed, a in rows]
    g = gens.assign(cond=cond)
    wide = {v: g.pivot_table(index="prompt", columns="cond", values=v, aggfunc="sum")
            for v in ("hits", "words")}  # fmt: skip
    return wide["hits"], wide["words"]


def _rate_difference(hits: pd.DataFrame, words: pd.DataFrame, sel: str, rnd: list[str],
                     alpha: float) -> tuple[float, float, float]:  # fmt: skip
    """Pooled rate of ``sel`` minus the mean pooled rate of the ``rnd`` conditions (the run's
    ``concept_rate``: concept words / all words), bootstrap interval over prompts, which pair the
    conditions (each prompt keeps its samples in every condition)."""
    h, w = hits[[sel, *rnd]].to_numpy(float), words[[sel, *rnd]].to_numpy(float)

    def diff(c: np.ndarray) -> float:
        rate = (c @ h) / (c @ w)
        return float(rate[0] - rate[1:].mean())

    return bootstrap_interval(diff, len(h), seed=int(abs(alpha) * 10))


def _cost_interval(
    table: pd.DataFrame, alpha: float, per_block: pd.DataFrame | None = None
) -> tuple[float, float, float]:
    """The corpus ΔCE of the selected heads at ``alpha``: a t-interval over the blocks' paired
    differences of ``per_block`` (the findings check of the run), else a conservative one from
    the two conditions' per-block sd (unpaired, so wider than the paired one)."""
    from scipy import stats

    if per_block is not None:
        d = per_block[np.isclose(per_block["alpha"], alpha)]["delta"].to_numpy()
        if len(d):
            return t_interval(d)

    ce = table[(table["metric"] == "ce") & (table["target"] != "concept")]
    sel = ce[(ce["selection"] == "selected") & np.isclose(ce["alpha"], alpha)]
    clean = ce[ce["selection"] == "clean"]
    if sel.empty or clean.empty:
        return math.nan, math.nan, math.nan
    a, b = sel.iloc[0], clean.iloc[0]
    half = stats.t.ppf(0.975, int(a["n"]) - 1) * math.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / a["n"])
    d = float(a["delta"])
    return d, d - half, d + half


def claims(gens: pd.DataFrame, table: pd.DataFrame,
           per_block: pd.DataFrame | None = None) -> tuple[list[Claim], str]:  # fmt: skip
    """The claims of one steering run and their combined verdict: at α = −1 the selected heads'
    concept rate is below the random sets' mean and the clean model's, at α = 5 above both (the
    run's pooled rate, paired over prompts; ``gens`` with :func:`word_counts`), and at both the
    corpus ΔCE stays below ``MAX_COST`` (paired over blocks when ``per_block`` is given)."""
    cost = ("t-interval over corpus blocks, paired" if per_block is not None
            else "conservative t-interval over corpus blocks")  # fmt: skip
    hits, words = _per_prompt(gens)
    clean = [c for c in hits.columns if c.startswith("clean:")]
    out = []
    for alpha, side, what in ((REMOVE, "<", "removes"), (AMPLIFY, ">", "amplifies")):
        at = [c for c in hits.columns if float(c.split(":")[2]) == alpha]
        sel = [c for c in at if c.startswith("selected:")]
        rnd = [c for c in at if c.startswith("random:")]
        if not sel or not rnd or not clean:
            continue
        rep = f"bootstrap over {len(hits)} prompts × {SAMPLES} samples, paired"
        for name, against in (("random sets", rnd), ("clean", clean)):
            out.append(Claim(f"α = {alpha:g} {what}: rate(selected) − rate({name})",
                             _rate_difference(hits, words, sel[0], against, alpha), 0, side,
                             digits=3, replicates=rep))  # fmt: skip
        out.append(Claim(f"α = {alpha:g}: corpus ΔCE of the selected heads",
                         _cost_interval(table, alpha, per_block), MAX_COST, "<",
                         replicates=cost))  # fmt: skip
    return out, combine([c.verdict for c in out])


def _check_rates(name: str, gens: pd.DataFrame, table: pd.DataFrame) -> None:
    """Stop unless the pooled rates recomputed from the generations equal the run's table."""
    rate = table[table["metric"] == "concept_rate"]
    for r in rate.itertuples():
        g = gens[
            (gens["selection"] == r.selection)
            & np.isclose(gens["alpha"], r.alpha)
            & ((gens["seed"] == r.seed) if not pd.isna(r.seed) else gens["seed"].isna())
        ]
        got = g["hits"].sum() / g["words"].sum()
        if abs(got - r.value) > 1e-9:
            raise SystemExit(f"findings: {name}: concept rate {got} from the generations vs the "
                             f"run's {r.value} ({r.selection}, α = {r.alpha:g})")  # fmt: skip


def _done(runs: Path, name: str) -> bool:
    return (runs / name / "results.parquet").is_file()


def _gate_line(runs: Path, concept: str, command: Callable[[str], str]) -> str:
    """The concept's gate fit: its command and the validation of its 3 most forget-specific heads
    (zero-ablation effect on the forget and retain sets against random heads)."""
    name = f"gate-{concept}"
    if not (runs / name / "heads.csv").is_file():
        return f"- {concept}, CHG fit: not run"
    line = f"- {concept}, CHG fit: {command(name)}; heads {chg_heads(runs, concept)}"
    fit = pd.read_csv(runs / name / "summary.csv")
    clean, fitted = fit[fit["gates"] == "clean"].iloc[0], fit[fit["gates"] != "clean"]
    line += (f"; retain NLL {clean['nll']:.2f} → {fitted['nll'].mean():.2f} and forget NLL "
             f"{clean['forget_nll']:.2f} → {fitted['forget_nll'].mean():.2f} under the fitted "
             f"gates, {int((pd.read_csv(runs / name / 'heads.csv')['role'] != 'kept').sum())} "
             "heads forget-specific")  # fmt: skip
    path = runs / name / "validation.csv"
    if path.is_file():
        v = pd.read_csv(path).groupby("group", sort=False)["effect"].agg(["mean", "std", "count"])
        parts = [f"{g} {r['mean']:+.3f}" + (f" ± {r['std']:.3f} ({int(r['count'])} draws)"
                                            if r["count"] > 1 else "")
                 for g, r in v.iterrows()]  # fmt: skip
        line += " (zero-ablation ΔCE: " + ", ".join(parts) + ")"
    return line


def render(runs: Path, command: Callable[[str], str], table_md: Callable[..., str]):
    """``(body, verdict, numbers)`` of the steering section (concepts whose runs are missing are
    named as not run), or ``None`` while no steering run has finished."""
    if not any(_done(runs, f"steer-{c}-{s}") for c in CONCEPTS for s in SELECTIONS):
        return None
    rows, per_concept, lines = [], {}, []
    for c in CONCEPTS:
        lines.append(_gate_line(runs, c, command))
        vs = []
        for s in SELECTIONS:
            name = f"steer-{c}-{s}"
            if not _done(runs, name):
                lines.append(f"- {c}, {s}: not run (no CPU time left in this regeneration)")
                continue
            table = pd.read_parquet(runs / name / "results.parquet")
            words = json.loads((runs / name / "manifest.json").read_text())["identity"][
                "concept"]["words"]  # fmt: skip
            gens = word_counts(pd.read_json(runs / name / "generations.jsonl", lines=True), words)
            _check_rates(name, gens, table)
            cost = runs / "checks" / f"{name}-cost.parquet"
            cs, v = claims(gens, table, pd.read_parquet(cost) if cost.is_file() else None)
            vs.append(v)
            heads = table[table["selection"] == "selected"]["heads"].iloc[0]
            rate = table[(table["metric"] == "concept_rate")]
            clean = float(rate[rate["selection"] == "clean"]["value"].iloc[0])
            for cl in cs:
                rows.append([c, f"{s} ({heads})", cl.what, cl.interval(), cl.verdict])
            lines.append(f"- {c}, {s}: {command(name)}; clean concept rate {clean:.3f}")
        complete = len(vs) == len(SELECTIONS)
        per_concept[c] = (
            "agrees" if "agrees" in vs
            else "disagrees" if complete and all(v == "disagrees" for v in vs)
            else "inconclusive"
        )  # fmt: skip
    overall = combine(list(per_concept.values()))
    body = "\n".join([
        *lines, "",
        table_md(["concept", "selection (heads)", "quantity", "estimate [95 % CI]", "verdict"],
                 rows), "",
        "Rates are the run's own (concept words / all words, pooled over samples); intervals of "
        f"their differences: bootstrap over prompts, each keeping its {SAMPLES} samples in every "
        "condition (paired, as conditions share sampling seeds); of the corpus ΔCE: t-interval "
        "over the corpus blocks, each paired with the clean model's CE of the same block "
        "(`scripts/findings_checks.py`, checked against the run's means). A selection controls "
        "its concept when all six of its claims agree; a concept agrees when some selection does "
        "and disagrees when every selection disagrees (a concept with a selection not run cannot "
        "disagree). "
        + ", ".join(f"{c}: **{v}**" for c, v in per_concept.items())
        + f'. "Rescaling a few concept heads controls the concept, unlike random heads": '
        f"**{overall}**.",
    ])  # fmt: skip
    numbers = ", ".join(f"{c} {v}" for c, v in per_concept.items())
    return body, overall, f"{numbers}; k = {K} heads, 100 prompts × {SAMPLES} samples"
