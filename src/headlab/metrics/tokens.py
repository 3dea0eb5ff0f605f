"""Next-token metrics: token ``t`` is scored from the logits at position ``t - 1`` where
:func:`next_token_mask` allows (cross-entropy, top-k accuracy, KL from the clean run)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.metrics.base import Metric, Scores, token_nll


def next_token_mask(batch: Batch) -> torch.Tensor:
    """``[batch, pos]`` bool: where token ``t`` is scored as a next-token target.

    ``batch.target_mask`` (default: every token), never column 0, and only where both token ``t``
    and the token ``t - 1`` it is predicted from are real (attention mask): a left-padded row's
    first real token is predicted from padding and is not scored.
    """
    mask = batch.target_mask
    if mask is None:
        mask = torch.ones_like(batch.input_ids, dtype=torch.bool)
    mask = mask.bool().clone()
    mask[:, 0] = False
    if batch.attention_mask is not None:
        real = batch.attention_mask.bool().to(mask.device)
        mask &= real
        mask[:, 1:] &= real[:, :-1]
    return mask


def _target_mask(batch: Batch, name: str) -> torch.Tensor:
    if batch.input_ids is None:
        raise ConfigError(f"metric {name!r} scores next tokens and needs input_ids")
    mask = next_token_mask(batch)
    if not mask.any():
        raise ConfigError(f"metric {name!r}: the loss mask selects no tokens in this batch")
    return mask


def _token_scores(name: str, values: torch.Tensor, mask: torch.Tensor) -> Scores:
    """``values``: [batch, pos-1] scores of predicting token t+1 at position t."""
    per_token = torch.full(mask.shape, math.nan, dtype=torch.float32, device=values.device)
    per_token[:, 1:] = values.float()
    per_token = per_token.masked_fill(~mask.to(values.device), math.nan)
    weight = mask.sum(1).float()
    per_example = torch.nan_to_num(per_token).sum(1) / weight.to(values.device)
    return Scores(name, per_example.cpu(), per_token.cpu(), weight.cpu())


def _next_logits(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 3 or logits.shape[:2] != batch.input_ids.shape:
        raise ConfigError(
            f"next-token metrics need [batch, pos, vocab] logits matching input_ids "
            f"{tuple(batch.input_ids.shape)}, got {tuple(logits.shape)}"
        )
    return logits[:, :-1].float(), batch.input_ids[:, 1:].to(logits.device)


@dataclass(frozen=True)
class CrossEntropy(Metric):
    """Next-token cross-entropy in nats."""

    name: str = "ce"

    def __call__(self, logits, batch, clean=None):
        mask = _target_mask(batch, self.name)
        lg, tgt = _next_logits(logits, batch)
        return _token_scores(self.name, token_nll(lg, tgt), mask)  # [batch, pos-1]


@dataclass(frozen=True)
class TopK(Metric):
    """Next-token top-k accuracy (1 when the target is among the k largest logits)."""

    k: int = 1
    name: str = field(default="")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"top-k accuracy needs k >= 1, got {self.k}")
        if not self.name:
            object.__setattr__(self, "name", f"top{self.k}")

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        mask = _target_mask(batch, self.name)
        lg, tgt = _next_logits(logits, batch)
        top = lg.topk(self.k, dim=-1).indices  # [batch, pos-1, k]
        hit = (top == tgt[..., None]).any(-1).float()
        return _token_scores(self.name, hit, mask)


@dataclass(frozen=True)
class KLFromClean(Metric):
    """KL(P_clean || P) of the next-token distribution at every scored prediction position."""

    name: str = "kl"
    needs_clean: bool = True

    def __call__(self, logits, batch, clean=None):
        if clean is None:
            raise ConfigError("the 'kl' metric needs the clean run's logits (clean=...)")
        mask = _target_mask(batch, self.name)
        lp = F.log_softmax(logits[:, :-1].float(), -1)
        lq = F.log_softmax(clean[:, :-1].float().to(logits.device), -1)
        kl = (lq.exp() * (lq - lp)).sum(-1)  # [batch, pos-1]
        return _token_scores(self.name, kl, mask)
