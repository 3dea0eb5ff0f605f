"""Plan execution: :func:`run_plans` groups plans by first intervened layer, replays the clean
prefix, stacks plans into shared forwards within a token budget (:func:`_budget`,
:func:`_auto_budget`) and scores each through :func:`~headlab.engine.score._score`;
:func:`evaluate` scores one plan."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from headlab.batch import Batch
from headlab.engine.clean import CleanCache, _measured_clean_run
from headlab.engine.score import _Clean, _full_logits, _logits_of, _score, concat_scores
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import (
    blocks_of,
    intervene,
    intervene_stacked,
    replay_blocks,
    tap_output_head,
)
from headlab.interventions import Plan, StatsSource, example_offset
from headlab.metrics import Metric, Scores, get_metric
from headlab.models.layout import Layout, call_model, describe, input_device


def _run_group(
    model: nn.Module,
    clean: _Clean,
    plans: Sequence[Plan],
    ms: list[Metric],
    *,
    first_layer: int,
    blocks: nn.ModuleList | None,
    stats: StatsSource | None,
    layout: Layout,
    window_tokens: int,
    start: int,
) -> list[dict[str, Scores]]:
    """Score ``plans`` (all first intervening at ``first_layer``) in one forward over the
    sub-batch that starts at example ``start`` of the whole batch."""
    chunk, k = clean.chunk, len(plans)
    n = len(chunk)
    full = _full_logits(ms, clean.plain_head)
    inputs = chunk.model_inputs()
    if k > 1:
        inputs = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in inputs.items()}
    with ExitStack() as stack:
        stack.enter_context(example_offset(start))
        if blocks is not None and clean.blocks is not None and first_layer > 0:
            stack.enter_context(replay_blocks(blocks, clean.blocks[:first_layer], repeat=k))
        if k == 1:
            stack.enter_context(intervene(model, plans[0], stats=stats, layout=layout))
        else:
            stack.enter_context(intervene_stacked(model, plans, n, stats=stats, layout=layout))
        # scored from the hidden state: the model's own head projects one position only
        tap = None if full else stack.enter_context(tap_output_head(model, lambda h: h[:, :1]))
        logits = _logits_of(call_model(model, inputs), model)
    out = []
    for j in range(k):
        part = slice(j * n, (j + 1) * n)
        if full:
            out.append(_score(model, ms, clean, logits[part], None, window_tokens))
        else:
            out.append(_score(model, ms, clean, None, tap.hidden[part], window_tokens))
    return out


def _budget(
    max_batch_tokens: int | str | None, seq: int, batch_size: int
) -> tuple[int, int | None]:
    """``(rows per sub-batch, tokens per forward or None for one plan per forward)``."""
    if max_batch_tokens is None:
        return batch_size, None
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int):
        raise ConfigError(
            f"max_batch_tokens must be a positive integer, 'auto' or None, got {max_batch_tokens!r}"
        )
    if max_batch_tokens < seq:
        raise ConfigError(
            f"max_batch_tokens={max_batch_tokens} is too small for even one plan: one sequence "
            f"has {seq} tokens. Use --max-batch-tokens {seq * batch_size} (one plan on a "
            f"sub-batch of {batch_size}) or more; at least {seq}"
        )
    return max(1, min(batch_size, max_batch_tokens // seq)), max_batch_tokens


def _auto_budget(clean: _Clean, device: torch.device, seq: int) -> int | None:
    """Tokens per forward that fit in 70 % of the free GPU memory, from the clean pass's peak."""
    if clean.bytes_per_token is None or clean.bytes_per_token <= 0:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(seq * len(clean.chunk), int(0.7 * free / clean.bytes_per_token))


def run_plans(
    model: nn.Module,
    batch: Batch,
    plans: Sequence[Plan],
    metrics: Sequence[str | Metric],
    *,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
    on_forward: Callable[[int], None] | None = None,
    max_batch_tokens: int | str | None = None,
    max_logit_tokens: int = 1024,
    prefix_reuse: bool = True,
    cache: CleanCache | None = None,
) -> list[dict[str, Scores]]:
    """Score every plan on ``batch``: one ``{metric name: Scores}`` per plan, in order.

    Args:
        model: the model (left unmodified).
        batch: the examples, split into sub-batches of ``batch_size``.
        plans: the plans to score (an empty ``Plan()`` scores the clean model).
        metrics: metric names or instances.
        stats: statistics for Mean/Median/Peak/Resample.
        on_forward: called with the number of examples after every intervened forward (progress).
        max_batch_tokens: token budget of one forward. ``None`` (default, fastest on CPU): one
            plan per forward on sub-batches of ``batch_size``. An integer stacks as many plans as
            fit (and shrinks sub-batches to fit); ``"auto"`` derives it from free GPU memory
            (``None`` on CPU).
        max_logit_tokens: at most this many positions are projected to the vocabulary at once for
            cross-entropy, top-k and KL (bounds memory; >= 2).
        prefix_reuse: replay the layers before each plan's first intervened layer from the clean
            run (disable to run every layer, e.g. for a family whose blocks cannot be replayed).
        cache: a :class:`CleanCache` shared by several calls on the same model and batch.
    """
    ms = [get_metric(m) for m in metrics]
    layout = layout if layout is not None else describe(model)
    for plan in plans:
        if not isinstance(plan, Plan):
            raise ConfigError(f"run_plans() takes headlab.Plan values, got {type(plan).__name__}")
        plan.check(layout.n_layers, layout.n_heads, layout.d_head)
    if max_logit_tokens < 2:
        raise ConfigError(f"max_logit_tokens must be at least 2, got {max_logit_tokens}")
    seq = max(batch.seq_len, 1)
    device = input_device(model)
    auto = max_batch_tokens == "auto"
    rows, budget = _budget(None if auto else max_batch_tokens, seq, batch_size)
    blocks = None
    if prefix_reuse:
        try:
            blocks = blocks_of(model, layout)
        except HeadlabError:
            blocks = None
    key = (id(model), rows, prefix_reuse, max_logit_tokens, tuple(m.name for m in ms))
    groups: dict[int, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(min(plan.layers) if len(plan) else -1, []).append(i)
    parts: list[dict[str, list[Scores]]] = [{m.name: [] for m in ms} for _ in plans]
    with torch.no_grad():
        for index, chunk in enumerate(batch.chunks(rows)):
            clean = cache._get(key, index, chunk) if cache is not None else None
            if clean is None:
                clean = _measured_clean_run(model, chunk.to(device), ms, blocks, max_logit_tokens)
                if cache is not None:
                    cache._put(index, clean)
            if auto and budget is None and device.type == "cuda":
                budget = _auto_budget(clean, device, seq)
            n = len(chunk)
            per_forward = 1 if budget is None else max(1, budget // (n * seq))
            for first, idx in sorted(groups.items()):
                if first < 0:
                    for i in idx:
                        for m in ms:
                            parts[i][m.name].append(clean.scores[m.name])
                        if on_forward is not None:
                            on_forward(n)
                    continue
                for s in range(0, len(idx), per_forward):
                    group = idx[s : s + per_forward]
                    results = _run_group(
                        model,
                        clean,
                        [plans[i] for i in group],
                        ms,
                        first_layer=first,
                        blocks=blocks,
                        stats=stats,
                        layout=layout,
                        window_tokens=max_logit_tokens,
                        start=index * rows,
                    )
                    for i, scores in zip(group, results, strict=True):
                        for name, sc in scores.items():
                            parts[i][name].append(sc)
                    if on_forward is not None:
                        on_forward(n * len(group))
    return [{name: concat_scores(p) for name, p in d.items()} for d in parts]


def evaluate(
    model: nn.Module,
    batch: Batch,
    metrics: Sequence[str | Metric],
    *,
    plan: Plan | None = None,
    stats: StatsSource | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
) -> dict[str, Scores]:
    """Score ``model`` on ``batch`` under ``plan`` (clean if omitted) with each metric."""
    plan = plan if plan is not None else Plan()
    return run_plans(
        model, batch, [plan], metrics, stats=stats, batch_size=batch_size, layout=layout
    )[0]
