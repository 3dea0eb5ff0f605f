"""Head-level attention rollout (METHODS.md section 6, "[ours] Head-level rollout").

Abnar & Zuidema's rollout mixes each layer's head-averaged attention with the identity; per head
the mass is uninformative (every head carries 0.5/H of what enters its layer), so a head is scored
by the rollout mass it routes from a target position to a set of source positions.
:func:`rollout_scores` is the formula on given patterns; :func:`rollout_per_example` runs the model
(eager attention) and scores every example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from headlab.analyses.attention.maps import mixed_attention
from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.models.attention import eager_attention
from headlab.models.layout import Layout, call_model, describe, input_device

__all__ = ["rollout_per_example", "rollout_scores"]


def rollout_scores(
    attentions: Sequence[torch.Tensor], target: torch.Tensor, sources: torch.Tensor
) -> torch.Tensor:
    """Head-level rollout: mass routed from ``target`` to ``sources`` through each head.

    ``s[l, h] = e_t R_{L:l+1} (0.5 / H) A_{l,h} R_{l-1:1} 1_S`` with ``A~_l = 0.5 mean_h A_{l,h}
    + 0.5 I`` (:func:`headlab.analyses.attention.maps.mixed_attention`) and ``R`` products of
    ``A~`` (Abnar & Zuidema rollout split at layer ``l``).

    Args:
        attentions: one ``[batch, head, pos, pos]`` pattern per layer (rows: queries).
        target: ``[batch]`` query position whose incoming mass is traced.
        sources: ``[batch, pos]`` bool, the source positions ``S``.

    Returns:
        ``[batch, layer, head]`` scores.
    """
    n_layers = len(attentions)
    _, n_heads, seq, _ = attentions[0].shape  # [batch, head, pos, pos]
    device = attentions[0].device
    att = [a.double() for a in attentions]
    mixed = [mixed_attention(a) for a in att]  # [batch, pos, pos] each
    below = [sources.double().to(device)]  # v_l = R_{l-1:1} 1_S, [batch, pos]
    for ly in range(n_layers - 1):
        below.append(torch.einsum("bij,bj->bi", mixed[ly], below[-1]))
    above = [torch.zeros(0)] * n_layers  # u_l = e_t R_{L:l+1}, [batch, pos]
    u = torch.nn.functional.one_hot(target.to(device), seq).double()
    for ly in range(n_layers - 1, -1, -1):
        above[ly] = u
        u = torch.einsum("bi,bij->bj", u, mixed[ly])
    scores = [
        (0.5 / n_heads) * torch.einsum("bi,bhij,bj->bh", above[ly], att[ly], below[ly])
        for ly in range(n_layers)
    ]
    return torch.stack(scores, dim=1)  # [batch, layer, head]


def _targets(chunk: Batch, target: int | None) -> torch.Tensor:
    n, seq = len(chunk), chunk.seq_len
    if target is not None:
        t = target + seq if target < 0 else target
        if not 0 <= t < seq:
            raise ConfigError(f"rollout target position {target} is outside length {seq}")
        return torch.full((n,), t, dtype=torch.long)
    if chunk.answer_pos is not None:
        return chunk.answer_pos.long().cpu()
    if chunk.attention_mask is not None:
        return chunk.attention_mask.long().cpu().sum(1) - 1
    return torch.full((n,), seq - 1, dtype=torch.long)


def _sources(chunk: Batch, target: torch.Tensor, sources: str) -> torch.Tensor:
    """``[batch, pos]`` bool: ``context`` = positions 1..t-1, ``previous`` = t-1."""
    n, seq = len(chunk), chunk.seq_len
    pos = torch.arange(seq)[None, :]
    t = target[:, None]
    if sources == "context":
        out = (pos >= 1) & (pos < t)
    elif sources == "previous":
        out = pos == t - 1
    else:
        raise ConfigError(f"rollout sources must be 'context' or 'previous', got {sources!r}")
    if chunk.attention_mask is not None:
        out &= chunk.attention_mask.bool().cpu()
    return out.reshape(n, seq)


def rollout_per_example(
    model: nn.Module,
    batch: Batch,
    *,
    batch_size: int = 8,
    layout: Layout | None = None,
    target: int | None = None,
    sources: str = "context",
) -> torch.Tensor:
    """Head-level rollout (:func:`rollout_scores`) of every example, ``[example, layer, head]``;
    ``estimate(methods=["rollout"])`` reports its mean over examples."""
    layout = layout if layout is not None else describe(model)
    if batch.input_ids is None:
        raise ConfigError("rollout traces token positions; it needs a batch of input_ids")
    if sources not in ("context", "previous"):
        raise ConfigError(f"rollout sources must be 'context' or 'previous', got {sources!r}")
    device = input_device(model)
    parts = []
    with torch.no_grad(), eager_attention(model):
        for chunk in batch.chunks(batch_size):
            out = call_model(model, chunk.to(device).model_inputs(), output_attentions=True)
            att = getattr(out, "attentions", None)
            if att is None or len(att) != layout.n_layers or any(a is None for a in att):
                raise ConfigError(
                    f"{type(model).__name__} returned no attention patterns, so rollout cannot "
                    "be computed; load it with attn_implementation='eager'"
                )
            tgt = _targets(chunk, target)
            parts.append(rollout_scores(att, tgt, _sources(chunk, tgt, sources)).cpu())
    return torch.cat(parts)  # [example, layer, head]
