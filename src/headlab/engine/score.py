"""The one scoring path: :func:`_score` scores a run (clean or intervened) of one sub-batch,
either from the model's logits or, for a plain output head (:func:`_plain_head`), by projecting
windows of the final hidden state (:func:`_windowed`); :func:`_full_logits` decides which.
:class:`_Clean` is the clean run of a sub-batch that scoring reads (and every plan reuses)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.hooks import BlockOutput
from headlab.metrics import CrossEntropy, KLFromClean, Metric, Scores, TopK
from headlab.metrics.tokens import _target_mask
from headlab.models.kinds import is_bare
from headlab.models.layout import call_model, input_device

#: metrics scored position by position from next-token logits (safe to window)
_WINDOWED = (CrossEntropy, TopK, KLFromClean)
#: config attributes of models that transform logits after the output head
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _logits_of(out: object, model: nn.Module) -> torch.Tensor:
    """The model's logits, or for a bare model (no head, :func:`is_bare`) its final hidden state
    ``[batch, pos, d_model]``, which only embedding metrics read (:func:`check_reads`)."""
    logits = getattr(out, "logits", None)
    if logits is None and is_bare(model):
        logits = getattr(out, "last_hidden_state", None)
    if logits is None:
        raise TypeError(
            f"{type(model).__name__} returns no logits; load the model with a head (causal LM, "
            "masked LM or classifier) to score it"
        )
    return logits


def check_reads(model: nn.Module, ms: Sequence[Metric]) -> None:
    """Refuse metrics that read what ``model`` does not return: logit metrics on a bare model
    (it returns its final hidden state) and embedding metrics on a model with a head."""
    bare = is_bare(model)
    for m in ms:
        if bare and m.reads != "embedding":
            raise ConfigError(
                f"metric {m.name!r} reads logits, but {type(model).__name__} is a bare model "
                "without an LM or classification head; score it with embed_cos (cosine distance "
                "of the mean-pooled sentence embedding to the clean one)"
            )
        if not bare and m.reads == "embedding":
            raise ConfigError(
                f"metric {m.name!r} scores the sentence embedding of a bare model (an encoder "
                f"without a head, e.g. --model minilm), but {type(model).__name__} has a head; "
                "use its own metrics (ce, kl, top1; cls_ce, cls_acc for a classifier)"
            )


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits on ``batch`` (``[batch, pos, vocab]`` or ``[batch, classes]``)."""
    device = input_device(model)
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
    check_reads(model, ms)
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
