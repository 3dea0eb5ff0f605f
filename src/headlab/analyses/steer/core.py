"""Steering: generate with some heads' outputs rescaled by alpha, against random-head controls.

:func:`steer_parts` runs one *condition* at a time — the clean model, the selected heads at each
alpha, and ``n_random`` sets of as many random heads (disjoint from the selected ones, drawn from
seeds ``seed, seed + 1, ...``) at the same alphas — generating from the concept's held-out prompts
under :func:`~headlab.analyses.steer_generate.rescaled`, and measures the concept frequency of the
generations (:func:`headlab.analyses.concepts.concept_rate`) and each off-target metric (e.g.
corpus cross-entropy, a task's metric, through the engine with a ``Scale(alpha)`` plan).
Sampling uses the same seed in every condition (common random numbers), so each condition is
reproducible on its own, in any order, and differences between conditions come from the
intervention, not from the dice.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from headlab.analyses.cascade import random_heads
from headlab.analyses.concepts import Concept, concept_rate
from headlab.analyses.steer_generate import (
    GenerateConfig,
    generate_ids,
    generate_texts,
    rescaled,
)
from headlab.analyses.steer_select import ConceptMass, concept_batch
from headlab.batch import Batch
from headlab.engine import CleanCache, run_plans
from headlab.errors import ConfigError
from headlab.interventions import Plan, Scale
from headlab.metrics import Metric, get_metric
from headlab.models.layout import Layout, describe

__all__ = [
    "Condition",
    "GenerateConfig",
    "SteerConfig",
    "SteerPart",
    "SteerResult",
    "conditions",
    "generate_ids",
    "generate_texts",
    "random_sets",
    "rescaled",
    "steer",
    "steer_parts",
    "with_baseline",
]

Head = tuple[int, int]
RAW_COLUMNS = ["selection", "seed", "alpha", "n_heads", "heads", "target", "metric", "value",
               "sd", "n"]  # fmt: skip


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
class SteerPart:
    """One condition's measurements (raw rows, no baseline yet) and generations."""

    condition: Condition
    table: pd.DataFrame
    generations: pd.DataFrame


def _heads_text(heads: Sequence[Head]) -> str:
    return ",".join(f"{ly}.{h}" for ly, h in heads)


def steer_parts(
    model: nn.Module,
    tokenizer: Any,
    concept: Concept,
    heads: Sequence[Head],
    *,
    config: SteerConfig | None = None,
    targets: Mapping[str, tuple[Batch, str | Metric]] | None = None,
    token_ids: Sequence[int] | None = None,
    skip: Container[str] = (),
    layout: Layout | None = None,
) -> Iterator[SteerPart]:
    """Yield every :func:`conditions` entry whose key is not in ``skip``, measured.

    Args:
        concept: words to count and held-out ``prompts`` to generate from.
        heads: the selected heads.
        targets: off-target measures ``{name: (batch, metric)}``, e.g.
            ``{"python-docs": (blocks, "ce"), "capitals": (task.eval, "answer_logprob")}``.
        token_ids: the concept's tokens; if given, also measure ``concept_logmass``, the
            log-probability mass of these tokens as the next token after each held-out prompt
            (deterministic, so it shows a shift that sampling noise may hide).
    """
    config = config if config is not None else SteerConfig()
    layout = layout if layout is not None else describe(model)
    if not heads:
        raise ConfigError("steering needs at least one selected (layer, head)")
    for ly, h in heads:
        layout.check_head(ly, h)
    targets = dict(targets or {})
    if token_ids is not None:
        mass = ConceptMass(tuple(int(t) for t in token_ids))
        targets = {"concept": (concept_batch(tokenizer, concept.prompts), mass), **targets}
    caches = {name: CleanCache() for name in targets}  # one clean pass per target batch
    for cond in conditions(heads, layout, config):
        if cond.key in skip:
            continue
        texts = generate_texts(
            model,
            tokenizer,
            concept.prompts,
            config.generate,
            heads=cond.heads,
            alpha=cond.alpha,
            layout=layout,
        )
        rate, per, _ = concept_rate(texts, concept.words)
        per_t = torch.tensor(per, dtype=torch.float64)
        ok = per_t[~per_t.isnan()]
        rows = [("concept", "concept_rate", rate, _sd(ok), len(ok))]
        plan = Plan.heads(list(cond.heads), Scale(cond.alpha)) if cond.heads else Plan()
        for name, (batch, metric) in targets.items():
            m = get_metric(metric)
            scores = run_plans(
                model,
                batch,
                [plan],
                [m],
                batch_size=config.batch_size,
                layout=layout,
                cache=caches[name],
            )[0][m.name]
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
                "prompt": list(concept.prompts),
                "text": texts,
                "concept_rate": per,
            }
        )
        yield SteerPart(cond, _typed(table), _typed(gens))


def _sd(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else math.nan


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype({"seed": "Int64", "alpha": "float64"})


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
    targets: Mapping[str, tuple[Batch, str | Metric]] | None = None,
    token_ids: Sequence[int] | None = None,
    layout: Layout | None = None,
) -> SteerResult:
    """Every condition of :func:`steer_parts` in one result (tables never printed)."""
    config = config if config is not None else SteerConfig()
    layout = layout if layout is not None else describe(model)
    parts = steer_parts(
        model,
        tokenizer,
        concept,
        heads,
        config=config,
        targets=targets,
        token_ids=token_ids,
        layout=layout,
    )
    parts = list(parts)
    table = with_baseline(pd.concat([p.table for p in parts], ignore_index=True))
    gens = pd.concat([p.generations for p in parts], ignore_index=True)
    sel = [tuple(h) for h in heads]
    rand = random_sets(layout, len(sel), config.n_random, seed=config.seed, exclude=sel)
    return SteerResult(table, gens, sel, rand)
