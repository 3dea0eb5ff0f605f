"""Iterative removal, backup flags and off-target cost against direct computations."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from tiny_models import build

import headlab as hl
from headlab.analyses.cascade import (
    backup_heads,
    cascade,
    cascade_steps,
    off_target,
    removed_heads,
)
from headlab.heads import random_heads
from headlab.plots.cascade import cascade_figure


@pytest.fixture(scope="module")
def setup():
    model = build("gpt2")
    gen = torch.Generator().manual_seed(0)
    batch = hl.Batch(input_ids=torch.randint(3, 96, (4, 10), generator=gen))
    return model, batch


def ce(model, batch, heads):
    plan = hl.Plan.heads(heads, hl.Zero()) if heads else hl.Plan()
    with torch.no_grad(), hl.intervene(model, plan):
        logits = model(input_ids=batch.input_ids).logits
    return hl.get_metric("ce")(logits, batch).mean


def test_rounds_equal_direct_computations(setup):
    model, batch = setup
    table = cascade(model, batch, steps=3)
    assert list(table.groupby("step").size()) == [8, 7, 6]
    singles = hl.sweep(model, batch, methods=["zero"], metrics=["ce"]).set_index(["layer", "head"])
    r0 = table[table.step == 0].set_index(["layer", "head"])
    assert r0["effect"].to_numpy() == pytest.approx(singles.loc[r0.index, "effect"].to_numpy())
    gone = removed_heads(table)
    assert gone[0] == r0["effect"].idxmax() and len(gone) == 3
    r2 = table[table.step == 2]
    base = ce(model, batch, gone[:2])
    assert r2["baseline"].iloc[0] == pytest.approx(base, rel=1e-5)
    some = r2.iloc[-1]
    want = ce(model, batch, [*gone[:2], (int(some["layer"]), int(some["head"]))]) - base
    assert some["effect"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert r2.loc[r2["removed"], "effect"].iloc[0] == r2["effect"].max()
    assert isinstance(cascade_figure(table, backup_heads(table), gone), Figure)


def test_resuming_gives_the_same_rounds(setup):
    model, batch = setup
    full = cascade(model, batch, steps=2, heads=[(0, 0), (0, 1), (1, 2), (1, 3)])
    first = removed_heads(full)[:1]
    rest = list(
        cascade_steps(model, batch, steps=2, heads=[(0, 0), (0, 1), (1, 2), (1, 3)], removed=first)
    )
    assert len(rest) == 1
    pd.testing.assert_frame_equal(
        rest[0].table.reset_index(drop=True), full[full.step == 1].reset_index(drop=True)
    )


def synthetic():
    rows = []
    effects = {0: {(0, 0): 5.0, (0, 1): 0.1, (1, 0): 0.2}, 1: {(0, 1): 3.0, (1, 0): 0.25}}
    picks = {0: (0, 0), 1: (0, 1)}
    for step, eff in effects.items():
        for (ly, h), e in eff.items():
            rows.append([step, step, ly, h, "zero", "ce", 0, 0, 0, e, e, (ly, h) == picks[step]])
    from headlab.analyses.cascade import COLUMNS

    return pd.DataFrame(rows, columns=COLUMNS)


def test_backup_flags_need_a_sharp_rise():
    flags = backup_heads(synthetic())
    assert len(flags) == 1
    row = flags.iloc[0]
    assert (row.layer, row["head"], row.trigger_layer, row.trigger_head) == (0, 1, 0, 0)
    assert row.rise == pytest.approx(2.9) and row.share == pytest.approx(2.9 / 5.0)
    assert backup_heads(synthetic(), share=0.7).empty  # 2.9 < 0.7 * 5
    with pytest.raises(hl.ConfigError):
        backup_heads(synthetic(), ratio=0.5)


def test_off_target_equals_direct_evaluation(setup):
    model, batch = setup
    layout = hl.describe(model)
    other = hl.Batch(input_ids=torch.randint(3, 96, (3, 12), generator=torch.Generator()))
    ctrl = random_heads(layout, 2, seed=1, exclude=[(0, 0), (1, 1)])
    assert len(ctrl) == 2 and not {(0, 0), (1, 1)} & set(ctrl)
    table = off_target(
        model, {"a": [(0, 0), (1, 1)], "random": ctrl},
        {"own": (batch, "ce"), "other": (other, "top1")},
    )  # fmt: skip
    assert len(table) == 4
    row = table[(table.selected_on == "a") & (table.target == "own")].iloc[0]
    want = ce(model, batch, [(0, 0), (1, 1)]) - ce(model, batch, [])
    assert row["delta"] == pytest.approx(want, abs=1e-6)
    top = table[(table.selected_on == "a") & (table.target == "other")].iloc[0]
    assert top["effect"] == pytest.approx(-top["delta"])


def test_bad_input(setup):
    model, batch = setup
    with pytest.raises(hl.ConfigError, match="steps must be"):
        cascade(model, batch, steps=9)
    with pytest.raises(hl.ConfigError, match="repeat"):
        cascade(model, batch, steps=1, heads=[(0, 0), (0, 0)])
    with pytest.raises(hl.ConfigError, match="statistics"):
        cascade(model, batch, steps=1, method="mean")
    with pytest.raises(hl.ConfigError, match="out of range"):
        cascade(model, batch, steps=1, heads=[(5, 0)])
