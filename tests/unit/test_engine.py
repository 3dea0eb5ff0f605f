"""The engine (prefix reuse, plan batching, logits only where needed) against a naive loop:
one ``intervene`` + full forward per plan on the whole batch, metrics on full logits."""

from __future__ import annotations

import pytest
import tiny_models as T
import torch
import transformers as tf

import headlab as hl
from headlab.engine import CleanCache, run_plans

#: decoder families with different block outputs (tensor / tuple), heads (bias, softcapping), GQA
FAMILIES = ["llama_gqa", "gpt2", "gptj", "gpt_neox", "opt", "phi", "gemma2", "qwen3", "bert"]
METRICS = ["ce", "top1", "kl"]
ANSWER_METRICS = ["logit_diff", "answer_logprob", "answer_acc"]


def deep_llama(n_layers: int = 4) -> torch.nn.Module:
    """A 4-layer Llama, so plans can start at several layers."""
    torch.manual_seed(3)
    cfg = tf.LlamaConfig(
        vocab_size=T.VOCAB,
        hidden_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def answer_batch(n: int = 5, seed: int = 4) -> hl.Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, T.VOCAB, (n, T.SEQ), generator=g)
    return hl.Batch(
        input_ids=ids,
        answer_pos=torch.randint(2, T.SEQ, (n,), generator=g),
        correct=torch.randint(3, T.VOCAB, (n,), generator=g),
        wrong=torch.randint(3, T.VOCAB, (n,), generator=g),
    )


def naive(model, batch, plans, metrics, stats=None):
    """The reference: one hooked full forward per plan on the whole batch."""
    ms = [hl.get_metric(m) for m in metrics]
    with torch.no_grad():
        clean = model(**batch.model_inputs()).logits
        out = []
        for plan in plans:
            with hl.intervene(model, plan, stats=stats):
                logits = model(**batch.model_inputs()).logits
            out.append({m.name: m(logits, batch, clean) for m in ms})
    return out


def assert_same(got, want, rtol=1e-5):
    """Relative difference <= rtol. KL is a difference of log-probabilities of size ~log(vocab),
    so fp32 rounding alone leaves ~1e-7 absolute: it gets an absolute floor of 1e-6."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            for attr in ("per_example", "per_token"):
                a, b = getattr(g[name], attr), getattr(w[name], attr)
                if b is None:
                    assert a is None
                    continue
                assert torch.equal(torch.isnan(a), torch.isnan(b)), (name, attr)
                a, b = torch.nan_to_num(a).double(), torch.nan_to_num(b).double()
                scale = b.abs().max().clamp_min(1e-3)
                err = float((a - b).abs().max())
                floor = 1e-6 if name == "kl" else 0.0
                assert err <= rtol * float(scale) + floor, (name, attr, err)
            torch.testing.assert_close(g[name].weight, w[name].weight)


def all_plans(n_layers: int, acts: hl.Activations) -> list[hl.Plan]:
    last = n_layers - 1
    return [
        hl.Plan(),
        hl.Plan.of({(0, 1): hl.Zero()}),
        hl.Plan.of({(last, 2): hl.Zero()}),
        hl.Plan.of({(last, 0): hl.Mean()}),
        hl.Plan.of({(last, 3): hl.Peak()}),
        hl.Plan.of({(last, 1): hl.Resample(seed=2)}),
        hl.Plan.of({(last, 1): hl.Scale(-1.0)}),
        hl.Plan.of({(last, 2): hl.Patch(acts)}),
        hl.Plan.of({(0, 0): hl.Median(), (last, 0): hl.Zero()}),
        hl.Plan.of({hl.Site(last, (1, 2), neurons=(0, 3), positions=(2, -1)): hl.Zero()}),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    name = request.param
    model = T.build(name)
    batch = hl.Batch(**T.inputs(name, batch=5))
    stats = hl.collect_stats(
        model,
        hl.Batch(**T.inputs(name, batch=6, seed=7)),
        config=hl.StatsConfig(bins=50, reservoir=4, warmup_tokens=64),
    )
    acts = hl.record(model, T.inputs(name, batch=5, seed=9))
    plans = all_plans(hl.describe(model).n_layers, acts)
    metrics = ["mlm_ce", "mlm_acc"] if name in T.ENCODERS else METRICS
    if name in T.ENCODERS:
        batch = hl.mlm_batch(batch.input_ids, mask_token_id=4, vocab_size=T.VOCAB, rate=0.3)
    want = naive(model, batch, plans, metrics, stats)
    return model, batch, stats, plans, metrics, want


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batch_size": 2},
        {"batch_size": 2, "max_logit_tokens": 5},
        {"max_batch_tokens": 3 * 5 * T.SEQ},
        {"batch_size": 2, "max_batch_tokens": 4 * T.SEQ, "max_logit_tokens": 7},
        {"prefix_reuse": False},
    ],
    ids=["default", "chunked", "logit-windows", "stacked", "stacked-chunked", "no-prefix"],
)
def test_engine_equals_naive_loop(fam, options):
    model, batch, stats, plans, metrics, want = fam
    got = run_plans(model, batch, plans, metrics, stats=stats, **options)
    assert_same(got, want)
    assert (got[1][metrics[0]].per_example - got[0][metrics[0]].per_example).abs().max() > 1e-5


@pytest.mark.parametrize("options", [{}, {"batch_size": 2, "max_batch_tokens": 6 * T.SEQ}])
def test_answer_metrics_equal_naive_loop(options):
    for name in ("llama_gqa", "gemma2", "gptj"):
        model = T.build(name)
        batch = answer_batch()
        plans = [hl.Plan(), hl.Plan.of({(0, 1): hl.Zero()}), hl.Plan.of({(1, 3): hl.Scale(3.0)})]
        metrics = [*ANSWER_METRICS, "ce"]
        got = run_plans(model, batch, plans, metrics, **options)
        assert_same(got, naive(model, batch, plans, metrics))


def test_several_first_layers_on_a_deeper_model():
    model = deep_llama()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    plans = [hl.Plan.of({(ly, h): hl.Zero()}) for ly in (3, 0, 2, 1) for h in (0, 3)]
    plans += [hl.Plan.of({(2, 1): hl.Zero(), (3, 2): hl.Scale(2.0)}), hl.Plan()]
    want = naive(model, batch, plans, METRICS)
    for options in ({}, {"batch_size": 3, "max_batch_tokens": 9 * T.SEQ}):
        assert_same(run_plans(model, batch, plans, METRICS, **options), want)


def test_padding_and_attention_mask():
    model = deep_llama()
    ids = torch.randint(3, T.VOCAB, (4, T.SEQ), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    batch = hl.Batch(input_ids=ids, attention_mask=mask)
    plans = [hl.Plan.of({(ly, 1): hl.Zero()}) for ly in range(4)]
    want = naive(model, batch, plans, METRICS)
    assert_same(run_plans(model, batch, plans, METRICS, batch_size=3, max_logit_tokens=4), want)


class Counter:
    """Counts calls of a module's forward (forward hooks fire even when a block is replayed, so
    count a submodule that only runs when the block really computes)."""

    def __init__(self, module):
        self.calls, self.shapes = 0, []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        self.shapes.append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)


def test_prefix_reuse_skips_early_layers_and_restores_the_model():
    model = deep_llama()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    mlps = [Counter(layer.mlp) for layer in model.model.layers]
    plans = [hl.Plan.of({(3, h): hl.Zero()}) for h in range(4)]
    run_plans(model, batch, plans, ["ce"])
    # one clean pass runs every layer; the four plans run only layer 3
    assert [c.calls for c in mlps] == [1, 1, 1, 5]
    for c in mlps:
        c.handle.remove()
    for layer in model.model.layers:
        assert "forward" not in layer.__dict__
        assert not layer.self_attn.o_proj._forward_pre_hooks
    assert not model.lm_head._forward_pre_hooks


def test_answer_metrics_project_only_the_answer_position():
    model = T.build("llama_gqa")
    batch = answer_batch()
    head = Counter(model.lm_head)
    run_plans(model, batch, [hl.Plan.of({(1, h): hl.Zero()}) for h in range(4)], ["logit_diff"])
    head.handle.remove()
    # the clean pass projects every position (and checks the head); then the clean run and each
    # plan are scored by projecting the answer position alone (the model's own head, inside an
    # intervened forward, projects one position too)
    assert head.shapes[0] == (5, T.SEQ, T.VOCAB)
    assert all(s == (5, 1, T.VOCAB) for s in head.shapes[1:]) and len(head.shapes) == 2 + 1 + 4 * 2


def test_cross_entropy_windows_bound_the_logits():
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    shapes = []
    orig = model.lm_head.forward

    def spy(x):
        shapes.append(tuple(x.shape))
        return orig(x)

    model.lm_head.forward = spy
    try:
        run_plans(model, batch, [hl.Plan.of({(1, 0): hl.Zero()})], ["ce"], max_logit_tokens=5)
    finally:
        del model.lm_head.forward
    plan_calls = shapes[2:]  # after the clean forward and its head check
    assert plan_calls and max(r * p for r, p, _ in plan_calls) <= 5


def test_plans_share_forwards_under_a_token_budget():
    model = T.build("gpt2")
    batch = hl.Batch(**T.inputs("gpt2", batch=2))
    forwards = Counter(model.transformer.wte)
    plans = [hl.Plan.of({(1, h): hl.Zero()}) for h in range(4)]
    run_plans(model, batch, plans, ["ce"], max_batch_tokens=3 * 2 * T.SEQ)
    forwards.handle.remove()
    assert forwards.calls == 1 + 2  # clean pass, then 3 + 1 stacked plans
    assert forwards.shapes[1][0] == 6


def test_clean_cache_runs_the_clean_pass_once():
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa", batch=4))
    embed = Counter(model.model.embed_tokens)
    cache = CleanCache()
    a = run_plans(model, batch, [hl.Plan.of({(0, 0): hl.Zero()})], METRICS, cache=cache)
    b = run_plans(model, batch, [hl.Plan.of({(1, 0): hl.Zero()})], METRICS, cache=cache)
    embed.handle.remove()
    assert embed.calls == 3  # one clean pass, two plans
    want = naive(
        model, batch, [hl.Plan.of({(0, 0): hl.Zero()}), hl.Plan.of({(1, 0): hl.Zero()})], METRICS
    )
    assert_same(a + b, want)
    other = hl.Batch(**T.inputs("llama_gqa", batch=4, seed=11))
    got = run_plans(model, other, [hl.Plan.of({(1, 0): hl.Zero()})], METRICS, cache=cache)
    assert_same(got, naive(model, other, [hl.Plan.of({(1, 0): hl.Zero()})], METRICS))


def test_budget_too_small_says_what_to_use():
    model = T.build("gpt2")
    batch = hl.Batch(**T.inputs("gpt2", batch=2))
    with pytest.raises(hl.ConfigError, match=r"too small for even one plan.*--max-batch-tokens 24"):
        run_plans(model, batch, [hl.Plan()], ["ce"], max_batch_tokens=5, batch_size=2)
    with pytest.raises(hl.ConfigError, match="max_logit_tokens must be at least 2"):
        run_plans(model, batch, [hl.Plan()], ["ce"], max_logit_tokens=1)


def test_auto_budget_is_one_plan_per_forward_on_cpu():
    model = T.build("gpt2")
    batch = hl.Batch(**T.inputs("gpt2", batch=2))
    forwards = Counter(model.transformer.wte)
    plans = [hl.Plan.of({(1, h): hl.Zero()}) for h in range(3)]
    got = run_plans(model, batch, plans, ["ce"], max_batch_tokens="auto")
    forwards.handle.remove()
    assert forwards.calls == 4
    assert_same(got, naive(model, batch, plans, ["ce"]))


def test_failure_inside_a_plan_leaves_the_model_clean():
    model = deep_llama()
    batch = hl.Batch(**T.inputs("llama_gqa", batch=2))
    with pytest.raises(hl.ConfigError, match="statistics"):
        run_plans(model, batch, [hl.Plan.of({(2, 0): hl.Mean()})], ["ce"])
    for layer in model.model.layers:
        assert "forward" not in layer.__dict__
        assert not layer.self_attn.o_proj._forward_pre_hooks
        assert not layer._forward_hooks
    assert not model.lm_head._forward_pre_hooks


def test_custom_metric_gets_full_logits():
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa", batch=3))

    def last_logit(logits, b):
        assert logits.shape == (3, T.SEQ, T.VOCAB)
        return logits[:, -1, 5]

    custom = hl.metrics.Custom(last_logit, name="last5")
    plans = [hl.Plan.of({(1, 1): hl.Zero()})]
    assert_same(
        run_plans(model, batch, plans, [custom, "ce"]), naive(model, batch, plans, [custom, "ce"])
    )


def test_vision_classifier_uses_the_plain_path():
    model = T.build("vit")
    inputs = T.inputs("vit", batch=4)
    batch = hl.Batch(**inputs, labels=torch.tensor([0, 1, 2, 3]))
    plans = [hl.Plan.of({(1, 1): hl.Zero()}), hl.Plan.of({(0, 2): hl.Zero()})]
    want = naive(model, batch, plans, ["cls_ce", "cls_acc"])
    assert_same(run_plans(model, batch, plans, ["cls_ce", "cls_acc"], batch_size=3), want)


def test_plain_head_check_tolerates_matmul_rounding_but_not_softcapping():
    from headlab.engine.score import _plain_head

    model = T.build("llama_gqa")
    hidden = torch.randn(2, 5, 32) * 30
    with torch.no_grad():
        logits = model.lm_head(hidden)
    rounding = logits + 2e-6 * logits.abs().max() * torch.randn_like(logits).sign()
    assert _plain_head(model, hidden, rounding)
    capped = 2.0 * torch.tanh(logits / 2.0)
    assert not _plain_head(model, hidden, capped)
    gemma2 = T.build("gemma2")  # final_logit_softcapping in its config
    with torch.no_grad():
        hidden = torch.randn(2, 5, 32)
        assert not _plain_head(gemma2, hidden, gemma2.lm_head(hidden))
