"""Masked-LM metrics (scored where ``batch.labels != -100``, at their own positions) and
:func:`mlm_batch`, which builds such a scoring batch BERT-style."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.metrics.base import Metric, Scores, token_nll


def _mlm(logits: torch.Tensor, batch: Batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.labels is None or batch.labels.ndim != 2:
        raise ConfigError(
            f"metric {name!r} needs masked-LM labels [batch, pos] (-100 = not scored); build the "
            "batch with headlab.mlm_batch(...)"
        )
    mask = batch.labels != -100
    if not mask.any():
        raise ConfigError(f"metric {name!r}: no token is selected for masked-LM scoring")
    return mask, batch.labels.to(logits.device)


def _mlm_scores(name: str, values: torch.Tensor, mask: torch.Tensor) -> Scores:
    per_token = values.float().masked_fill(~mask.to(values.device), math.nan).cpu()
    weight = mask.sum(1).float()
    per_example = torch.nan_to_num(per_token).sum(1) / weight
    return Scores(name, per_example, per_token, weight)


@dataclass(frozen=True)
class MaskedLMCrossEntropy(Metric):
    """Cross-entropy on the masked-LM positions (labels != -100)."""

    name: str = "mlm_ce"
    reads: str = "labels"

    def __call__(self, logits, batch, clean=None):
        mask, labels = _mlm(logits, batch, self.name)
        return _mlm_scores(self.name, token_nll(logits, labels.clamp_min(0)), mask)


@dataclass(frozen=True)
class MaskedLMAccuracy(Metric):
    """Top-1 accuracy on the masked-LM positions."""

    name: str = "mlm_acc"
    reads: str = "labels"

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        mask, labels = _mlm(logits, batch, self.name)
        return _mlm_scores(self.name, (logits.argmax(-1) == labels).float(), mask)


def mlm_batch(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: set[int] | frozenset[int] = frozenset(),
    rate: float = 0.15,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> Batch:
    """BERT-style masked-LM scoring batch: ``rate`` of the (non-special) tokens are chosen; of
    those 80 % become the mask token, 10 % a random token, 10 % stay; labels hold the originals
    at the chosen positions and -100 elsewhere."""
    if not 0 < rate <= 1:
        raise ConfigError(f"masked-LM rate must be in (0, 1], got {rate}")
    gen = torch.Generator().manual_seed(seed)
    ids = input_ids.clone()
    eligible = torch.ones_like(ids, dtype=torch.bool)
    for s in special_ids:
        eligible &= ids != s
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    chosen = (torch.rand(ids.shape, generator=gen) < rate) & eligible
    if not chosen.any():  # guarantee at least one scored token per batch
        first = eligible.nonzero()
        if not len(first):
            raise ConfigError("mlm_batch: no maskable (non-special) token in the batch")
        chosen[first[0, 0], first[0, 1]] = True
    roll = torch.rand(ids.shape, generator=gen)
    rand_tok = torch.randint(0, vocab_size, ids.shape, generator=gen)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_token_id), ids)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), rand_tok, ids)
    return Batch(input_ids=ids, attention_mask=attention_mask, labels=labels)
