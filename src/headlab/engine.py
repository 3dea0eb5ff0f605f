"""Executes plans and scores them. Every analysis goes through here.

:func:`run_plans` is the one entry point analyses use to score many plans on one batch. It loops
over sub-batches on the outside and plans on the inside, and skips work three ways, without ever
re-implementing a model's forward:

- **Prefix reuse.** One clean pass per sub-batch records every block's output. A plan whose first
  intervened layer is ``l`` runs with blocks ``0..l-1`` replaced by their recorded outputs
  (:func:`headlab.hooks.replay_blocks`); the model's own forward still runs everything else.
  Plans are grouped by first layer and run in that order.
- **Plan batching.** With ``max_batch_tokens``, several plans share one forward over stacked
  copies of the sub-batch, plan ``k`` acting on slice ``k``
  (:func:`headlab.hooks.intervene_stacked`). On CPU this gains nothing (the forward is
  compute-bound), so the default runs one plan per forward; ``"auto"`` sizes the stack from free
  GPU memory.
- **Logits only where needed.** The final hidden state is tapped at the model's output head
  (:func:`headlab.hooks.tap_output_head`). One-position metrics (``reads == "answer"``) make the
  model project only ``answer_pos`` (anything the model applies after the head still runs).
  Cross-entropy, top-k and KL apply the output head to windows of at most ``max_logit_tokens``
  tokens, so memory stays bounded; this needs a plain head (the model's logits equal
  ``get_output_embeddings()(hidden)``, checked on every clean run), otherwise full logits are used.
  Each window is projected once for all such metrics.
- **One scoring path.** The clean run and every intervened run are scored by the same function
  (:func:`_score`) on the same shapes, and every metric has one formula (cross-entropy is
  :func:`headlab.metrics.token_nll`), so a delta carries no bias from the scoring code.

A :class:`CleanCache` passed to several calls (a sweep calls once per layer) shares the clean
passes between them. The numbers equal those of one :func:`headlab.intervene` + full forward
per plan (up to float rounding, relative difference < 1e-5 in fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import (
    BlockOutput,
    blocks_of,
    capture_blocks,
    intervene,
    intervene_stacked,
    replay_blocks,
    tap_output_head,
)
from headlab.interventions import Plan, StatsSource, example_offset
from headlab.metrics import (
    CrossEntropy,
    KLFromClean,
    Metric,
    Scores,
    TopK,
    _target_mask,
    get_metric,
)
from headlab.models.layout import Layout, call_model, describe

__all__ = ["CleanCache", "concat_scores", "evaluate", "forward_logits", "run_plans"]

#: metrics scored position by position from next-token logits (safe to window)
_WINDOWED = (CrossEntropy, TopK, KLFromClean)
#: config attributes of models that transform logits after the output head
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _logits_of(out: object, model: nn.Module) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(
            f"{type(model).__name__} returns no logits; load the model with a head (causal LM, "
            "masked LM or classifier) to score it"
        )
    return logits


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits on ``batch`` (``[batch, pos, vocab]`` or ``[batch, classes]``)."""
    device = next(model.parameters()).device
    return _logits_of(call_model(model, batch.to(device).model_inputs()), model)


def concat_scores(parts: Sequence[Scores]) -> Scores:
    """Join the scores of consecutive sub-batches."""
    first = parts[0]
    return Scores(
        first.name,
        torch.cat([p.per_example for p in parts]),
        None if first.per_token is None else torch.cat([p.per_token for p in parts]),
        torch.cat([p.weight for p in parts]),
    )


@dataclass(eq=False)
class _Clean:
    """The clean run of one sub-batch: what every plan on it reuses."""

    chunk: Batch  # on the model's device
    blocks: list[BlockOutput] | None  # each block's output, for prefix reuse
    hidden: torch.Tensor | None  # final hidden state [batch, pos, d_model] (None: head untapped)
    plain_head: bool  # the model's logits equal output_head(hidden)
    logits: torch.Tensor | None  # full clean logits, kept only where they cannot be recomputed
    scores: dict[str, Scores]
    bytes_per_token: float | None = None  # peak GPU memory of the clean pass per token


class CleanCache:
    """Clean runs shared by several :func:`run_plans` calls on one model and one batch.

    A sweep calls :func:`run_plans` once per layer; passing the same cache to every call runs the
    clean pass of each sub-batch once instead of once per call. It holds every block's output
    (``layers x examples x pos x d_model`` floats) and is valid only while the model's weights
    stay unchanged; a call with another model, batch, chunking or metrics replaces its content.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._runs: dict[int, _Clean] = {}

    def _get(self, key: tuple, index: int, chunk: Batch) -> _Clean | None:
        if key != self._key:
            self._key, self._runs = key, {}
            return None
        run = self._runs.get(index)
        if run is None or not _same_inputs(run.chunk, chunk):
            return None
        return run

    def _put(self, index: int, run: _Clean) -> None:
        self._runs[index] = run

    def clear(self) -> None:
        """Forget every stored clean run."""
        self._key, self._runs = None, {}


def _same_inputs(a: Batch, b: Batch) -> bool:
    pairs = (
        (a.input_ids, b.input_ids),
        (a.pixel_values, b.pixel_values),
        (a.attention_mask, b.attention_mask),
    )
    for x, y in pairs:
        if (x is None) != (y is None):
            return False
        if x is not None and (x.shape != y.shape or not torch.equal(x.cpu(), y.cpu())):
            return False
    return True


def _clean_run(
    model: nn.Module,
    chunk: Batch,
    ms: list[Metric],
    blocks: nn.ModuleList | None,
    window_tokens: int,
) -> _Clean:
    recorded: dict[int, BlockOutput] = {}
    with ExitStack() as stack:
        if blocks is not None:
            stack.enter_context(capture_blocks(blocks, recorded.__setitem__))
        try:
            tap = stack.enter_context(tap_output_head(model))
        except HeadlabError:
            tap = None
        logits = _logits_of(call_model(model, chunk.model_inputs()), model)
    hidden = tap.hidden.detach() if tap is not None and tap.calls == 1 else None
    plain = hidden is not None and _plain_head(model, hidden, logits)
    full = _full_logits(ms, plain)
    clean = _Clean(
        chunk=chunk,
        blocks=[recorded[i] for i in range(len(blocks))]
        if blocks is not None and len(recorded) == len(blocks)
        else None,
        hidden=hidden if plain else None,
        plain_head=plain,
        logits=logits if full and any(m.needs_clean for m in ms) else None,
        scores={},
    )
    # the clean run is scored by the same code, on the same shapes, as every intervened run
    clean.scores = _score(model, ms, clean, logits if full else None, hidden, window_tokens)
    return clean


def _plain_head(model: nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's logits are ``get_output_embeddings()(hidden)`` (nothing applied after
    the head), checked at the first position up to matmul rounding (relative to the largest
    logit), and by the config attributes of known logit transforms."""
    if any(getattr(model.config, a, None) not in (None, 1, 1.0) for a in _POST_HEAD):
        return False
    if logits.ndim != 3 or logits.shape[:2] != hidden.shape[:2]:
        return False
    with torch.no_grad():
        mine = model.get_output_embeddings()(hidden[:, :1]).float()  # [batch, 1, vocab]
    theirs = logits[:, :1].detach().float()
    if mine.shape != theirs.shape:
        return False
    tol = max(1e-5, 8 * torch.finfo(hidden.dtype).eps)
    scale = max(float(theirs.abs().max()), 1.0)
    return float((mine - theirs).abs().max()) <= tol * scale


def _full_logits(ms: list[Metric], plain_head: bool) -> bool:
    """Whether runs are scored from the model's full logits rather than from the output head
    applied to the final hidden state (only windowed next-token and answer metrics can be)."""
    return not plain_head or any(m.reads != "answer" and type(m) not in _WINDOWED for m in ms)


def _windowed(
    ms: list[Metric],
    head: nn.Module,
    hidden: torch.Tensor,
    clean_hidden: torch.Tensor,
    chunk: Batch,
    window_tokens: int,
) -> dict[str, Scores]:
    """Next-token metrics from ``head`` applied to windows of ``hidden`` ([batch, pos, d]); each
    window is projected once and scored by every metric. Metrics that compare with the clean run
    read the clean logits of the same window (``head`` on ``clean_hidden``)."""
    masks = {m.name: _target_mask(chunk, m.name) for m in ms}  # [batch, pos] each
    mask = next(iter(masks.values()))
    n, seq = mask.shape
    per_token = {m.name: torch.full((n, seq), math.nan) for m in ms}
    if seq <= window_tokens:
        rows_per, width = max(1, window_tokens // seq), seq
    else:
        rows_per, width = 1, window_tokens
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        a = 0
        while a < seq - 1:
            b = min(seq - 1, a + width - 1)  # positions a..b predict targets a+1..b
            if mask[r0:r1, a + 1 : b + 1].any():
                sub = Batch(
                    input_ids=chunk.input_ids[r0:r1, a : b + 1],
                    target_mask=mask[r0:r1, a : b + 1],
                )
                lg = head(hidden[r0:r1, a : b + 1])  # [rows, width, vocab]
                cl = None
                if any(m.needs_clean for m in ms):
                    cl = head(clean_hidden[r0:r1, a : b + 1])  # [rows, width, vocab]
                for m in ms:
                    values = m(lg, sub, cl if m.needs_clean else None).per_token[:, 1:]
                    per_token[m.name][r0:r1, a + 1 : b + 1] = values
            a = b
    weight = mask.sum(1).float().cpu()
    return {
        name: Scores(name, torch.nan_to_num(pt).sum(1) / weight, pt, weight)
        for name, pt in per_token.items()
    }


def _score(
    model: nn.Module,
    ms: list[Metric],
    clean: _Clean,
    logits: torch.Tensor | None,
    hidden: torch.Tensor | None,
    window_tokens: int = 1024,
) -> dict[str, Scores]:
    """Every metric of one run (clean or intervened) of ``clean.chunk``: the one scoring path.

    With ``logits`` (``[batch, pos, vocab]`` or ``[batch, classes]``), each metric reads them
    (compared metrics read the clean run's logits). Otherwise the model has a plain head and
    ``hidden`` is its final hidden state ``[batch, pos, d_model]``: next-token metrics project
    windows of it, answer metrics project the answer positions, always with the same shapes.
    """
    chunk = clean.chunk
    if logits is not None:
        cl = clean.logits if clean.logits is not None else logits
        return {m.name: m(logits, chunk, cl if m.needs_clean else None) for m in ms}
    head = model.get_output_embeddings()
    windowed = [m for m in ms if m.reads != "answer"]
    scores = {}
    if windowed:
        scores.update(_windowed(windowed, head, hidden, clean.hidden, chunk, window_tokens))
    if len(windowed) < len(ms):
        if chunk.answer_pos is None:
            raise ConfigError("an answer metric needs batch.answer_pos (use a task batch)")
        rows = torch.arange(len(chunk), device=hidden.device)
        pos = chunk.answer_pos.to(hidden.device)
        lg = head(hidden[rows, pos][:, None])[:, 0]  # [batch, vocab]
        for m in ms:
            if m.reads == "answer":
                scores[m.name] = m(lg, chunk, None)
    return {m.name: scores[m.name] for m in ms}


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


def _measured_clean_run(
    model: nn.Module,
    chunk: Batch,
    ms: list[Metric],
    blocks: nn.ModuleList | None,
    window_tokens: int,
) -> _Clean:
    """:func:`_clean_run`, recording its peak GPU memory per token on CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return _clean_run(model, chunk, ms, blocks, window_tokens)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    clean = _clean_run(model, chunk, ms, blocks, window_tokens)
    peak = torch.cuda.max_memory_allocated(device) - base
    clean.bytes_per_token = peak / max(
        1, chunk.input_ids.numel() if chunk.input_ids is not None else len(chunk)
    )
    return clean


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
    device = next(model.parameters()).device
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
                clean = _measured_clean_run(
                    model, chunk.to(device), ms, blocks, max_logit_tokens
                )
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
