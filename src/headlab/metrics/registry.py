"""Choosing a metric: the built-ins by name (:func:`get_metric`, :func:`metric_names`) or a user
callable wrapped as :class:`Custom`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.metrics.answer import (
    AnswerAccuracy,
    AnswerLogprob,
    ClassAccuracy,
    ClassCrossEntropy,
    LogitDiff,
)
from headlab.metrics.base import Metric, Scores, _example_scores
from headlab.metrics.embedding import EmbeddingCosine
from headlab.metrics.masked import MaskedLMAccuracy, MaskedLMCrossEntropy
from headlab.metrics.tokens import CrossEntropy, KLFromClean, TopK


@dataclass(frozen=True, eq=False)
class Custom(Metric):
    """A user callable ``fn(logits, batch) -> Tensor`` of shape ``[batch]`` or ``[batch, pos]``
    (NaN where not scored)."""

    fn: Callable[[torch.Tensor, Batch], torch.Tensor] = field(repr=False)
    name: str = "custom"
    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        out = self.fn(logits, batch)
        if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2):
            raise ConfigError(
                f"custom metric {self.name!r} must return a tensor [batch] or [batch, pos], got "
                f"{type(out).__name__} {getattr(out, 'shape', '')}"
            )
        if out.shape[0] != len(batch):
            raise ConfigError(
                f"custom metric {self.name!r} returned {out.shape[0]} rows for "
                f"{len(batch)} examples"
            )
        if out.ndim == 1:
            return _example_scores(self.name, out.detach())
        out = out.detach().float().cpu()
        mask = ~torch.isnan(out)
        weight = mask.sum(1).float()
        return Scores(self.name, torch.nan_to_num(out).sum(1) / weight, out, weight)


_BY_NAME: dict[str, Callable[[], Metric]] = {
    "ce": CrossEntropy,
    "top1": lambda: TopK(1),
    "top5": lambda: TopK(5),
    "top10": lambda: TopK(10),
    "kl": KLFromClean,
    "logit_diff": LogitDiff,
    "answer_logprob": AnswerLogprob,
    "answer_acc": AnswerAccuracy,
    "mlm_ce": MaskedLMCrossEntropy,
    "mlm_acc": MaskedLMAccuracy,
    "cls_ce": ClassCrossEntropy,
    "cls_acc": ClassAccuracy,
    "embed_cos": EmbeddingCosine,
}


def metric_names() -> list[str]:
    """Names accepted by :func:`get_metric` (plus ``topK`` for any K)."""
    return list(_BY_NAME)


def get_metric(name: str | Metric) -> Metric:
    """A metric by name (``ce``, ``top1``, ``top3``, ``kl``, ``logit_diff`` ...) or as given."""
    if isinstance(name, Metric):
        return name
    if name in _BY_NAME:
        return _BY_NAME[name]()
    if name.startswith("top") and name[3:].isdigit():
        return TopK(int(name[3:]))
    raise ConfigError(f"unknown metric {name!r}; choose from {', '.join(metric_names())}, topK")
