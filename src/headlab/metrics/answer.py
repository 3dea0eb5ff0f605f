"""One score per example: task metrics read the logits at ``batch.answer_pos`` (logit
difference, answer log-probability and accuracy); classification metrics compare
``[batch, classes]`` logits with ``batch.labels``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.metrics.base import Metric, _example_scores, token_nll


def _answer_logits(logits: torch.Tensor, batch: Batch, name: str) -> torch.Tensor:
    if batch.answer_pos is None or batch.correct is None:
        raise ConfigError(
            f"metric {name!r} reads one answer position: the batch needs answer_pos and correct "
            "(use a task such as --task names or capitals)"
        )
    if logits.ndim == 2:  # already gathered at the answer position: [batch, vocab]
        return logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_pos.to(logits.device)].float()  # [batch, vocab]


@dataclass(frozen=True)
class LogitDiff(Metric):
    """Logit of the correct answer minus logit of the wrong one, at ``answer_pos``."""

    name: str = "logit_diff"
    reads: str = "answer"

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        lg = _answer_logits(logits, batch, self.name)
        if batch.wrong is None:
            raise ConfigError("'logit_diff' needs batch.wrong, the competing answer token")
        c = lg.gather(1, batch.correct.to(lg.device)[:, None])[:, 0]
        w = lg.gather(1, batch.wrong.to(lg.device)[:, None])[:, 0]
        return _example_scores(self.name, c - w)


@dataclass(frozen=True)
class AnswerLogprob(Metric):
    """Log-probability of the correct answer token at ``answer_pos``."""

    name: str = "answer_logprob"
    reads: str = "answer"

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        lg = _answer_logits(logits, batch, self.name)  # [batch, vocab]
        return _example_scores(self.name, -token_nll(lg, batch.correct))


@dataclass(frozen=True)
class AnswerAccuracy(Metric):
    """1 when the correct answer is the top-1 token at ``answer_pos``."""

    name: str = "answer_acc"
    reads: str = "answer"

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        lg = _answer_logits(logits, batch, self.name)
        hit = (lg.argmax(-1) == batch.correct.to(lg.device)).float()
        return _example_scores(self.name, hit)


def _cls(logits: torch.Tensor, batch: Batch, name: str) -> torch.Tensor:
    if logits.ndim != 2 or batch.labels is None or batch.labels.ndim != 1:
        raise ConfigError(f"metric {name!r} needs [batch, classes] logits and class labels [batch]")
    return batch.labels.to(logits.device)


@dataclass(frozen=True)
class ClassCrossEntropy(Metric):
    """Classification cross-entropy (e.g. ViT on labelled images)."""

    name: str = "cls_ce"
    reads: str = "class"

    def __call__(self, logits, batch, clean=None):
        labels = _cls(logits, batch, self.name)
        return _example_scores(self.name, token_nll(logits, labels))


@dataclass(frozen=True)
class ClassAccuracy(Metric):
    """Classification top-1 accuracy."""

    name: str = "cls_acc"
    reads: str = "class"

    higher_is_better: bool = True

    def __call__(self, logits, batch, clean=None):
        labels = _cls(logits, batch, self.name)
        return _example_scores(self.name, (logits.argmax(-1) == labels).float())
