"""Distribution-shift measures against an independent computation from ``output_hidden_states``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tiny_models import build

import headlab as hl
from headlab.analyses.shift import conditions, shift
from headlab.plots.shift import shift_figure


@pytest.fixture(scope="module")
def setup():
    model = build("gpt2")
    gen = torch.Generator().manual_seed(0)
    batch = hl.Batch(input_ids=torch.randint(3, 96, (4, 10), generator=gen))
    stats_batch = hl.Batch(input_ids=torch.randint(3, 96, (8, 10), generator=gen))
    stats = hl.collect_stats(model, stats_batch, config=hl.StatsConfig(bins=50, reservoir=8))
    return model, batch, stats


def hidden(model, batch, plan=None, stats=None):
    """Block outputs [layer, tokens, d_model] (GPT-2: hidden_states[l + 1] for l < last) and
    logits, from a plain forward."""
    plan = plan if plan is not None else hl.Plan()
    with torch.no_grad(), hl.intervene(model, plan, stats=stats):
        out = model(input_ids=batch.input_ids, output_hidden_states=True)
    hs = torch.stack(out.hidden_states[1:-1]).flatten(1, 2).double()  # [layer, tokens, d]
    return hs, out.logits


def test_measures_equal_an_independent_computation(setup):
    model, batch, stats = setup
    conds = conditions([(0, 1), (0, 3)], ["zero", "resample"], each=True)
    table = shift(model, batch, conds, stats=stats, batch_size=3)
    clean, clean_logits = hidden(model, batch)
    mu, sd = clean.mean(1, keepdim=True), clean.std(1, unbiased=False, keepdim=True)
    for c in conds:
        abl, logits = hidden(model, batch, c.plan, stats)
        rows = table[(table.method == c.method) & (table.target == c.target)]
        at0 = rows[rows.at_layer == 0].set_index("metric")["value"]  # GPT-2 layer 0 < last
        ratio = abl[0].norm(dim=-1).mean() / clean[0].norm(dim=-1).mean()
        assert at0["norm_ratio"] == pytest.approx(float(ratio), rel=1e-5)
        beyond = ((abl[0] - mu[0]).abs() > 3 * sd[0]).double().mean()
        assert at0["frac_3sigma"] == pytest.approx(float(beyond), abs=1e-9)
        lq = F.log_softmax(clean_logits[:, :-1], -1)
        kl = (lq.exp() * (lq - F.log_softmax(logits[:, :-1], -1))).sum(-1)  # [batch, pos - 1]
        out = rows[rows.at_layer == 2].set_index("metric")
        assert out.loc["kl", "value"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
        assert set(rows.at_layer) == {0, 1, 2}
    base = table[table.metric == "frac_3sigma"]["baseline"].iloc[0]
    assert base == pytest.approx(float(((clean[0] - mu[0]).abs() > 3 * sd[0]).double().mean()))
    assert set(table.target) == {"top2", "L0.H1", "L0.H3"}
    assert isinstance(shift_figure(table), Figure)


def test_layers_before_the_ablation_are_not_reported_and_zero_departs_more(setup):
    model, batch, stats = setup
    conds = conditions([(1, 2)], ["zero", "mean"])
    table = shift(model, batch, conds, stats=stats)
    assert set(table.at_layer) == {1, 2} and set(table.layer) == {1}
    kl = table[table.metric == "kl"].set_index("method")["value"]
    assert kl["zero"] > 0 and kl["mean"] > 0


def test_bad_input(setup):
    model, batch, stats = setup
    with pytest.raises(hl.ConfigError, match="at least one head"):
        conditions([])
    with pytest.raises(hl.ConfigError, match="statistics"):
        shift(model, batch, conditions([(0, 0)], ["mean"]))
    with pytest.raises(hl.ConfigError, match="out of range"):
        shift(model, batch, conditions([(7, 0)], ["zero"]), stats=stats)
    with pytest.raises(hl.ConfigError, match="unknown method"):
        conditions([(0, 0)], ["bogus"])
