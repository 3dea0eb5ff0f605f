"""Metrics: how well the model does on a batch, per token, per example and overall.

Next-token metrics score token ``t`` from the logits at position ``t - 1`` wherever
``batch.target_mask[:, t]`` (and the attention mask) is true; ``per_token[:, t]`` holds that
score and NaN elsewhere. One-position task metrics read the logits at ``batch.answer_pos``.
Masked-LM metrics score ``batch.labels != -100`` at their own positions; classification metrics
compare ``[batch, classes]`` logits with ``batch.labels``. Embedding metrics (``embed_cos``) score
a bare model's final hidden state ``[batch, pos, d_model]`` against the clean run's.

Every metric returns :class:`Scores`; its ``mean`` is token-weighted for token metrics.
"""

from headlab.metrics.answer import AnswerAccuracy as AnswerAccuracy
from headlab.metrics.answer import AnswerLogprob as AnswerLogprob
from headlab.metrics.answer import ClassAccuracy as ClassAccuracy
from headlab.metrics.answer import ClassCrossEntropy as ClassCrossEntropy
from headlab.metrics.answer import LogitDiff as LogitDiff
from headlab.metrics.base import Metric as Metric
from headlab.metrics.base import Scores as Scores
from headlab.metrics.base import token_nll as token_nll
from headlab.metrics.embedding import EmbeddingCosine as EmbeddingCosine
from headlab.metrics.embedding import sentence_embedding as sentence_embedding
from headlab.metrics.masked import MaskedLMAccuracy as MaskedLMAccuracy
from headlab.metrics.masked import MaskedLMCrossEntropy as MaskedLMCrossEntropy
from headlab.metrics.masked import mlm_batch as mlm_batch
from headlab.metrics.registry import Custom as Custom
from headlab.metrics.registry import get_metric as get_metric
from headlab.metrics.registry import metric_names as metric_names
from headlab.metrics.tokens import CrossEntropy as CrossEntropy
from headlab.metrics.tokens import KLFromClean as KLFromClean
from headlab.metrics.tokens import TopK as TopK
from headlab.metrics.tokens import next_token_mask as next_token_mask

__all__ = [
    "AnswerAccuracy",
    "AnswerLogprob",
    "ClassAccuracy",
    "ClassCrossEntropy",
    "CrossEntropy",
    "Custom",
    "EmbeddingCosine",
    "KLFromClean",
    "LogitDiff",
    "MaskedLMAccuracy",
    "MaskedLMCrossEntropy",
    "Metric",
    "Scores",
    "TopK",
    "get_metric",
    "metric_names",
    "mlm_batch",
    "sentence_embedding",
    "token_nll",
]
