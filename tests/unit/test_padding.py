"""Left-padded batches give the numbers of the same examples unpadded, for every tiny family.

Each test scores three examples of different lengths twice: once as one left-padded batch with an
``attention_mask``, once one example at a time without padding, and compares the numbers on the
real tokens (clean runs, plans through the engine with prefix reuse and plan stacking, statistics,
patching, gates, steered generation).
"""

from __future__ import annotations

import pytest
import tiny_models as T
import torch

import headlab as hl
from headlab.analyses.gates import loss_targets, masked_nll
from headlab.analyses.steer.generate import GenerateConfig, generate_ids
from headlab.engine import run_plans
from headlab.errors import ConfigError
from headlab.models.layout import with_position_ids

FAMILIES = sorted(T.BUILDERS)
DECODERS = [f for f in FAMILIES if f not in T.ENCODERS]
LENGTHS = (T.SEQ, T.SEQ - 3, T.SEQ - 7)  # 12, 9, 5 tokens
PAD = 2  # not a RoBERTa padding_idx, so positions must come from the attention mask
TOL = 1e-5


def examples(name: str, seed: int = 1) -> list[torch.Tensor]:
    """Three token rows of different lengths ([pos] each)."""
    ids = T.inputs(name, batch=len(LENGTHS), seed=seed)["input_ids"]
    return [ids[i, :n] for i, n in enumerate(LENGTHS)]


def metric(name: str) -> str:
    return "mlm_ce" if name in T.ENCODERS else "ce"


def single(name: str, row: torch.Tensor) -> hl.Batch:
    """One example, unpadded (every token after the first is a target / every token labelled)."""
    ids = row[None]  # [1, pos]
    if name in T.ENCODERS:
        return hl.Batch(input_ids=ids, labels=ids.clone())
    return hl.Batch(input_ids=ids)


def padded(name: str, rows: list[torch.Tensor]) -> hl.Batch:
    """The rows left-padded to one width; the same targets as :func:`single` on each row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)  # [batch, pos]
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    if name in T.ENCODERS:
        return hl.Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    first = mask.bool() & (mask.cumsum(1) == 1)  # each row's first real token is no target
    return hl.Batch(input_ids=ids, attention_mask=mask, target_mask=mask.bool() & ~first)


def real(per_token: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """Row ``i``'s values on its ``n`` real (rightmost) positions."""
    return per_token[i, per_token.shape[1] - n :]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; NaN (unscored) must sit at the same places in both."""
    assert torch.equal(a.isnan(), b.isnan()), "padded and unpadded runs score different tokens"
    keep = ~a.isnan()
    return float((a[keep].double() - b[keep].double()).abs().max()) if keep.any() else 0.0


def compare_scores(name, rows, padded_scores, single_scores) -> float:
    """Max abs difference of per-token values on real tokens (and of per-example means)."""
    worst = 0.0
    for i, (row, one) in enumerate(zip(rows, single_scores, strict=True)):
        worst = max(worst, max_diff(real(padded_scores.per_token, i, len(row)), one.per_token[0]))
        worst = max(worst, abs(float(padded_scores.per_example[i] - one.per_example[0])))
    return worst


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = T.build(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_clean_runs_and_forward_logits(models, name):
    model, rows = models(name), examples(name)
    batch = padded(name, rows)
    m = metric(name)
    got = hl.evaluate(model, batch, [m])[m]
    want = [hl.evaluate(model, single(name, r), [m])[m] for r in rows]
    assert compare_scores(name, rows, got, want) <= TOL
    with torch.no_grad():
        logits = hl.forward_logits(model, batch)  # [batch, pos, vocab]
        for i, r in enumerate(rows):
            one = hl.forward_logits(model, single(name, r))[0]
            assert float((logits[i, -len(r) :] - one).abs().max()) <= TOL


def plans_for(model) -> list[hl.Plan]:
    return [
        hl.Plan(),
        hl.Plan.of({(0, 1): hl.Zero()}),
        hl.Plan.of({(1, 2): hl.Mean(), (1, 0): hl.Zero()}),  # prefix reuse replays block 0
        hl.Plan.of({(0, 3): hl.Mean(), (1, 1): hl.Scale(-1.0)}),
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_plans_with_prefix_reuse_and_stacking(models, name):
    model, rows = models(name), examples(name)
    batch = padded(name, rows)
    m = metric(name)
    stats = hl.collect_stats(model, batch, config=hl.StatsConfig(bins=20, reservoir=0))
    plans = plans_for(model)
    want = [run_plans(model, single(name, r), plans, [m], stats=stats) for r in rows]
    width = batch.seq_len
    for options in ({}, {"max_batch_tokens": 3 * len(rows) * width}, {"prefix_reuse": False}):
        got = run_plans(model, batch, plans, [m], stats=stats, batch_size=2, **options)
        for p in range(len(plans)):
            one = [w[p][m] for w in want]
            assert compare_scores(name, rows, got[p][m], one) <= TOL, (options, p)
    got = hl.evaluate(model, batch, [m], plan=plans[2], stats=stats)[m]
    one = [hl.evaluate(model, single(name, r), [m], plan=plans[2], stats=stats)[m] for r in rows]
    assert compare_scores(name, rows, got, one) <= TOL


def test_default_target_mask_scores_no_token_predicted_from_padding(models):
    model, rows = models("gpt2"), examples("gpt2")
    b = padded("gpt2", rows)
    batch = hl.Batch(input_ids=b.input_ids, attention_mask=b.attention_mask)  # default targets
    got = hl.evaluate(model, batch, ["ce"])["ce"]
    want = [hl.evaluate(model, single("gpt2", r), ["ce"])["ce"] for r in rows]
    assert compare_scores("gpt2", rows, got, want) <= TOL


@pytest.mark.parametrize("skip_first", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_statistics_ignore_padding(models, name, skip_first):
    model, rows = models(name), examples(name)
    config = hl.StatsConfig(bins=20, reservoir=0, skip_first=skip_first)
    got = hl.collect_stats(model, padded(name, rows), config=config)
    want = hl.collect_stats(model, [single(name, r) for r in rows], config=config)
    n = sum(LENGTHS) - (len(rows) if skip_first else 0)
    assert torch.equal(got.count, want.count) and int(got.count.max()) == n
    for what in ("mean", "var", "min", "max"):
        assert float((getattr(got, what) - getattr(want, what)).abs().max()) <= TOL, what
    for key in ("lo", "hi"):
        assert float((got.tensors[key] - want.tensors[key]).abs().max()) <= TOL, key
    # each neuron's histogram holds the same tokens (a value on a bin edge may move by one bin)
    assert torch.equal(got.tensors["hist"].sum(-1), want.tensors["hist"].sum(-1))


def test_reservoir_keeps_no_padding_activations(models):
    model, rows = models("gpt2"), examples("gpt2")
    batch = padded("gpt2", rows)
    stats = hl.collect_stats(model, batch, config=hl.StatsConfig(bins=20, reservoir=3))
    res = stats.tensors["reservoir"]  # [layer, K, pos, N]
    acts = hl.record(model, batch.model_inputs(model))
    mask = batch.attention_mask.bool()
    for layer in range(2):
        flat = acts[layer].reshape(*mask.shape, -1)  # [batch, pos, N]
        assert torch.equal(res[layer][~mask], torch.zeros_like(res[layer][~mask]))
        assert float((res[layer][mask] - flat[mask]).abs().max()) <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_patching_from_a_padded_counterfactual(models, name):
    model, rows, cf_rows = models(name), examples(name), examples(name, seed=7)
    m = metric(name)
    heads = [(1, 0), (1, 3), (0, 2)]
    # callers record the counterfactual from plain model_inputs(); record() adds the positions
    source = hl.record(model, padded(name, cf_rows).model_inputs())
    got = hl.evaluate(model, padded(name, rows), [m], plan=hl.Plan.heads(heads, hl.Patch(source)))
    want = []
    for r, c in zip(rows, cf_rows, strict=True):
        src = hl.record(model, single(name, c).model_inputs())
        plan = hl.Plan.heads(heads, hl.Patch(src))
        want.append(hl.evaluate(model, single(name, r), [m], plan=plan)[m])
    assert compare_scores(name, rows, got[m], want) <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_gate_nll(models, name):
    model, rows = models(name), examples(name)
    layout = hl.describe(model)
    gates = torch.rand(
        2, layout.n_layers, layout.n_heads, generator=torch.Generator().manual_seed(0)
    )
    batch = padded(name, rows)
    with torch.no_grad():
        got, has = masked_nll(model, batch, loss_targets(batch), gates, layout)
        assert bool(has.all())
        for i, r in enumerate(rows):
            one = single(name, r)
            want, _ = masked_nll(model, one, loss_targets(one), gates, layout)  # [mask, 1]
            assert float((got[:, i] - want[:, 0]).abs().max()) <= TOL


@pytest.mark.parametrize("name", DECODERS)
def test_steered_generation(models, name):
    model, rows = models(name), examples(name)
    prompts = [r[:n].tolist() for r, n in zip(rows, (7, 4, 2), strict=True)]
    config = GenerateConfig(max_new_tokens=4, greedy=True, batch_size=3)
    heads, alpha = [(0, 1), (1, 2)], 3.0
    got = generate_ids(model, prompts, config, pad_token_id=PAD, heads=heads, alpha=alpha)
    one = GenerateConfig(max_new_tokens=4, greedy=True, batch_size=1)
    want = generate_ids(model, prompts, one, pad_token_id=PAD, heads=heads, alpha=alpha)
    assert got == want
    # the logits of every step, not only the argmax
    batch = padded(name, [torch.tensor(p) for p in prompts])
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), hl.rescaled(model, heads, alpha):
        out = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pad_token_id=PAD, **kw
        )
        for i, p in enumerate(prompts):
            alone = model.generate(input_ids=torch.tensor([p]), pad_token_id=PAD, **kw)
            for step, (both, one) in enumerate(zip(out.scores, alone.scores, strict=True)):
                assert float((both[i] - one[0]).abs().max()) <= TOL, (i, step)


def test_right_padding_and_unpadded_batches_get_no_position_ids(models):
    model = models("gpt2")
    ids = torch.arange(3, 15).reshape(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: the default positions are already right
    assert "position_ids" not in hl.Batch(input_ids=ids, attention_mask=mask).model_inputs(model)
    assert "position_ids" not in hl.Batch(input_ids=ids).model_inputs(model)
    mask[1] = torch.tensor([0, 0, 1, 1, 1, 1])
    got = hl.Batch(input_ids=ids, attention_mask=mask).model_inputs(model)["position_ids"]
    assert got.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]


def test_roberta_positions_start_after_its_padding_index(models):
    model = models("roberta")
    ids = torch.arange(3, 9).reshape(1, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    got = with_position_ids(model, {"input_ids": ids, "attention_mask": mask})["position_ids"]
    assert got.tolist() == [[1, 1, 2, 3, 4, 5]]  # padding_idx 1, real tokens from 2


def test_a_model_without_position_ids_refuses_left_padding():
    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    ids = torch.ones(1, 4, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    with pytest.raises(ConfigError, match="position_ids"):
        with_position_ids(NoPositions(), inputs)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert with_position_ids(NoPositions(), right) == right
