"""Steering: generate with some heads' outputs rescaled by alpha, against random-head controls.

Each *condition* — the clean model, the selected heads at one alpha, or one of ``n_random`` sets
of as many random heads (disjoint from the selected ones, drawn with seeds ``seed, seed + 1, ...``)
at one alpha — is a :class:`SteerPart`. It generates from the concept's held-out prompts under
:func:`~headlab.analyses.steer.generate.rescaled`, measures the concept frequency of the
generations (:func:`~headlab.analyses.steer.concepts.concept_rate`) and each off-target metric
(e.g. corpus cross-entropy, a task's metric, through the engine with a ``Scale(alpha)`` plan).
Sampling uses the same seed in every condition (common random numbers), so each condition is
reproducible on its own, in any order, and differences between conditions come from the
intervention, not from the dice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from headlab.analyses.steer.concepts import Concept, concept_rate
from headlab.analyses.steer.generate import GenerateConfig, generate_texts
from headlab.analyses.steer.select import ConceptMass, concept_batch
from headlab.batch import Batch
from headlab.engine import CleanCache, run_plans
from headlab.errors import ConfigError
from headlab.heads import Head, random_heads
from headlab.interventions import Plan, Scale
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe
from headlab.parts import Context, Part

__all__ = [
    "Condition",
    "ConditionOutput",
    "SteerConfig",
    "SteerPart",
    "SteerResult",
    "conditions",
    "random_sets",
    "steer",
    "steer_context",
    "steer_plan",
    "steer_summary",
    "steer_targets",
    "with_baseline",
]

RAW_COLUMNS = ["selection", "seed", "alpha", "n_heads", "heads", "target", "metric", "value",
               "sd", "n"]  # fmt: skip
#: a target: what a condition scores besides its generations, ``{name: (batch, metric)}``
Targets = Mapping[str, tuple[Batch, str | Metric]]


@dataclass(frozen=True)
class SteerConfig:
    """The steering experiment: alphas, random controls and sampling."""

    alphas: tuple[float, ...] = (-1.0, 0.0, 0.5, 2.0, 5.0)
    n_random: int = 3
    seed: int = 0
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    batch_size: int = 8

    def __post_init__(self) -> None:
        alphas = tuple(float(a) for a in self.alphas)
        if not alphas:
            raise ConfigError("the alpha list is empty; give at least one alpha (e.g. -1,0,2,5)")
        if any(not math.isfinite(a) for a in alphas) or len(set(alphas)) != len(alphas):
            raise ConfigError(f"alphas must be distinct finite numbers, got {list(alphas)}")
        object.__setattr__(self, "alphas", alphas)
        if self.n_random < 0:
            raise ConfigError(f"n_random must be >= 0, got {self.n_random}")


@dataclass(frozen=True)
class Condition:
    """One generation run: which heads (``selection`` = clean / selected / random) at which
    alpha; ``seed`` is the random-head seed (``None`` unless random)."""

    selection: str
    seed: int | None
    alpha: float
    heads: tuple[Head, ...]

    @property
    def key(self) -> str:
        a = f"{self.alpha:g}".replace("-", "m").replace(".", "p")
        s = "" if self.seed is None else f"-s{self.seed}"
        return f"{self.selection}{s}-a{a}"


def random_sets(
    layout: Layout, k: int, n: int, *, seed: int = 0, exclude: Sequence[Head] = ()
) -> dict[int, list[Head]]:
    """``{seed + i: k distinct random heads}`` for ``i < n``, none of them in ``exclude``."""
    return {seed + i: random_heads(layout, k, seed=seed + i, exclude=exclude) for i in range(n)}


def conditions(heads: Sequence[Head], layout: Layout, config: SteerConfig) -> list[Condition]:
    """Clean (alpha 1), then the selected heads and each random set at every alpha."""
    sel = tuple(tuple(h) for h in heads)
    out = [Condition("clean", None, 1.0, ())]
    out += [Condition("selected", None, a, sel) for a in config.alphas]
    controls = random_sets(layout, len(sel), config.n_random, seed=config.seed, exclude=sel)
    for s, rand in controls.items():
        out += [Condition("random", s, a, tuple(rand)) for a in config.alphas]
    return out


@dataclass(frozen=True, eq=False)
class ConditionOutput:
    """What one condition measured: its raw rows (no baseline yet) and its generations."""

    table: pd.DataFrame
    generations: pd.DataFrame


@dataclass(frozen=True)
class SteerPart(Part):
    """One condition, measured: texts generated from the concept's held-out prompts with the
    condition's heads rescaled, their concept rate, and each target's metric under the same
    scaling. ``targets`` are ``(name, metric)`` pairs, the batch being ``ctx.batches[name]``;
    generation reads ``ctx.tokenizer``. A job saves it as two parts: ``steer-<condition>``
    (:attr:`key`, the table) and ``gen-<condition>`` (:attr:`gen_key`, the generations)."""

    condition: Condition
    concept: Concept
    generate: GenerateConfig
    targets: tuple[tuple[str, str | Metric], ...] = ()

    @property
    def key(self) -> str:
        return f"steer-{self.condition.key}"

    @property
    def gen_key(self) -> str:
        return f"gen-{self.condition.key}"

    def cost(self, ctx: Context) -> int:
        return 1  # progress counts conditions

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> ConditionOutput:
        if ctx.tokenizer is None:
            raise ConfigError("steering generates text: give the Context the model's tokenizer")
        cond = self.condition
        texts = generate_texts(
            ctx.model, ctx.tokenizer, self.concept.prompts, self.generate, heads=cond.heads,
            alpha=cond.alpha, layout=ctx.layout,
        )  # fmt: skip
        rate, per, _ = concept_rate(texts, self.concept.words)
        per_t = torch.tensor(per, dtype=torch.float64)
        ok = per_t[~per_t.isnan()]
        rows = [("concept", "concept_rate", rate, _sd(ok), len(ok))]
        plan = Plan.heads(list(cond.heads), Scale(cond.alpha)) if cond.heads else Plan()
        for name, metric in self.targets:
            m = get_metric(metric)
            cache = ctx.caches.setdefault(name, CleanCache())  # one clean pass per target batch
            scores = run_plans(
                ctx.model, ctx.batches[name], [plan], [m], batch_size=ctx.batch_size,
                layout=ctx.layout, cache=cache,
            )[0][m.name]  # fmt: skip
            ex = scores.per_example.double()
            rows.append((name, m.name, scores.mean, _sd(ex[~ex.isnan()]), int((~ex.isnan()).sum())))
        common = [cond.selection, cond.seed, cond.alpha, len(cond.heads), _heads_text(cond.heads)]
        table = pd.DataFrame([[*common, *r] for r in rows], columns=RAW_COLUMNS)
        gens = pd.DataFrame(
            {
                "selection": cond.selection,
                "seed": cond.seed,
                "alpha": cond.alpha,
                "prompt_index": range(len(texts)),
                "prompt": list(self.concept.prompts),
                "text": texts,
                "concept_rate": per,
            }
        )
        if on_forward is not None:
            on_forward(1)
        return ConditionOutput(_typed(table), _typed(gens))


def _heads_text(heads: Sequence[Head]) -> str:
    return ",".join(f"{ly}.{h}" for ly, h in heads)


def _sd(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else math.nan


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype({"seed": "Int64", "alpha": "float64"})


def steer_targets(
    tokenizer: Any,
    concept: Concept,
    targets: Targets | None = None,
    token_ids: Sequence[int] | None = None,
) -> dict[str, tuple[Batch, str | Metric]]:
    """Every target a condition scores: given ``token_ids`` (the concept's tokens), first
    ``concept``: the log-probability mass of these tokens as the next token after each held-out
    prompt (deterministic, so it shows a shift that sampling noise may hide); then ``targets``,
    off-target measures such as ``{"python-docs": (blocks, "ce"), "capitals": (task.eval,
    "answer_logprob")}``."""
    out: dict[str, tuple[Batch, str | Metric]] = {}
    if token_ids is not None:
        mass = ConceptMass(tuple(int(t) for t in token_ids))
        out["concept"] = (concept_batch(tokenizer, concept.prompts), mass)
    return {**out, **dict(targets or {})}


def steer_plan(
    heads: Sequence[Head],
    layout: Layout,
    concept: Concept,
    config: SteerConfig,
    targets: Targets,
) -> list[SteerPart]:
    """The parts of a steering experiment, one per :func:`conditions` entry, each scoring
    ``targets`` (see :func:`steer_targets`) besides its generations."""
    if not heads:
        raise ConfigError("steering needs at least one selected (layer, head)")
    for ly, h in heads:
        layout.check_head(ly, h)
    metrics = tuple((name, metric) for name, (_, metric) in targets.items())
    return [
        SteerPart(c, concept, config.generate, metrics) for c in conditions(heads, layout, config)
    ]


def steer_context(
    model: nn.Module,
    tokenizer: Any,
    layout: Layout,
    concept: Concept,
    config: SteerConfig,
    targets: Targets,
) -> Context:
    """What the parts of :func:`steer_plan` read: the model, its tokenizer, the held-out prompts
    (as the main batch) and every target's batch by name."""
    batches = {name: batch for name, (batch, _) in targets.items()}
    prompts = (
        batches["concept"] if "concept" in batches else concept_batch(tokenizer, concept.prompts)
    )
    return Context(
        model, layout, prompts, batch_size=config.batch_size, batches=batches, tokenizer=tokenizer
    )


def with_baseline(raw: pd.DataFrame) -> pd.DataFrame:
    """Add ``baseline`` (the clean model's value of the same target and metric) and
    ``delta = value - baseline``; rows in condition order."""
    clean = raw[raw["selection"] == "clean"].set_index(["target", "metric"])["value"]
    if clean.empty:
        raise ConfigError("the steering table has no clean condition to compare with")
    out = raw.copy()
    out["baseline"] = [
        clean.get((t, m), math.nan) for t, m in zip(out.target, out.metric, strict=True)
    ]
    out["delta"] = out["value"] - out["baseline"]
    order = {"clean": 0, "selected": 1, "random": 2}
    out = out.assign(_o=out["selection"].map(order)).sort_values(
        ["_o", "seed", "alpha", "target", "metric"], kind="stable", na_position="first"
    )
    cols = [*RAW_COLUMNS[:8], "baseline", "delta", "sd", "n"]
    return out.drop(columns="_o").reset_index(drop=True)[cols]


def _rows(table: pd.DataFrame, target: str, metric: str) -> pd.DataFrame:
    return table[(table["target"] == target) & (table["metric"] == metric)]


def steer_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per alpha: the selected heads' concept rate, the random controls' mean and sd
    (over seeds), and ``d_<target>_<metric>_selected`` / ``_random`` (mean over seeds) changes vs
    the clean model for every other measure (``d_concept_logmass_*`` for the concept's own
    next-token log-mass)."""
    rate = _rows(table, "concept", "concept_rate")
    clean = rate[rate["selection"] == "clean"]["value"]
    is_rate = (table["target"] == "concept") & (table["metric"] == "concept_rate")
    others = table[~is_rate][["target", "metric"]].drop_duplicates()
    out = []
    for alpha in sorted(set(rate[rate["selection"] != "clean"]["alpha"])):
        sel = rate[(rate["selection"] == "selected") & (rate["alpha"] == alpha)]["value"]
        rnd = rate[(rate["selection"] == "random") & (rate["alpha"] == alpha)]["value"]
        row = {
            "alpha": alpha,
            "clean_rate": float(clean.iloc[0]) if len(clean) else math.nan,
            "selected_rate": float(sel.iloc[0]) if len(sel) else math.nan,
            "random_mean": float(rnd.mean()) if len(rnd) else math.nan,
            "random_sd": float(rnd.std()) if len(rnd) > 1 else math.nan,
            "n_random": len(rnd),
        }
        for t, m in others.itertuples(index=False):
            sub = _rows(table, t, m)
            s = sub[(sub["selection"] == "selected") & (sub["alpha"] == alpha)]["delta"]
            r = sub[(sub["selection"] == "random") & (sub["alpha"] == alpha)]["delta"]
            name = m if t == "concept" else f"{t}_{m}"
            row[f"d_{name}_selected"] = float(s.iloc[0]) if len(s) else math.nan
            row[f"d_{name}_random"] = float(r.mean()) if len(r) else math.nan
        out.append(row)
    return pd.DataFrame(out)


@dataclass(frozen=True, eq=False)
class SteerResult:
    """What :func:`steer` measured: the tidy ``table``, every generation, the heads used."""

    table: pd.DataFrame
    generations: pd.DataFrame
    heads: list[Head]
    random: dict[int, list[Head]]


def steer(
    model: nn.Module,
    tokenizer: Any,
    concept: Concept,
    heads: Sequence[Head],
    *,
    config: SteerConfig | None = None,
    targets: Targets | None = None,
    token_ids: Sequence[int] | None = None,
    layout: Layout | None = None,
) -> SteerResult:
    """Every condition of :func:`steer_plan`, measured, in one result (tables never printed).

    Args:
        concept: words to count and held-out ``prompts`` to generate from.
        heads: the selected heads.
        targets: off-target measures ``{name: (batch, metric)}`` (see :func:`steer_targets`).
        token_ids: the concept's tokens; if given, also measure ``concept_logmass``.
    """
    config = config if config is not None else SteerConfig()
    layout = layout if layout is not None else describe(model)
    scored = steer_targets(tokenizer, concept, targets, token_ids)
    parts = steer_plan(heads, layout, concept, config, scored)
    ctx = steer_context(model, tokenizer, layout, concept, config, scored)
    outputs = [p.run(ctx) for p in parts]
    table = with_baseline(pd.concat([o.table for o in outputs], ignore_index=True))
    gens = pd.concat([o.generations for o in outputs], ignore_index=True)
    sel = [tuple(h) for h in heads]
    rand = random_sets(layout, len(sel), config.n_random, seed=config.seed, exclude=sel)
    return SteerResult(table, gens, sel, rand)
