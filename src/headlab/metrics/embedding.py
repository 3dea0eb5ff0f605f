"""Metrics of models without an LM head: how far an intervention moves the sentence embedding.

A bare encoder (``BertModel``, all-MiniLM-L6-v2) returns its final hidden state
``[batch, pos, d_model]`` instead of logits; the engine hands that to these metrics in place of
logits (``reads = "embedding"``). The sentence embedding is the sentence-transformers one: the mean
of the final hidden state over the real tokens (``attention_mask``; every token without one),
divided by its L2 norm (:func:`sentence_embedding`).

``embed_cos`` is the cosine distance of each example's embedding to the clean run's,
``1 - cos(e, e_clean)``, computed as ``|u - v|^2 / 2`` of the unit vectors ``u``, ``v``: the same
number, without the cancellation of ``1 - cos`` for small distances, and exactly 0 for the clean
run itself, which is scored by the same formula against itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.batch import Batch
from headlab.errors import ConfigError
from headlab.metrics.base import Metric, _example_scores

__all__ = ["EmbeddingCosine", "sentence_embedding"]


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` ``[batch, pos, d]`` over the real tokens of ``attention_mask``
    ``[batch, pos]`` (all tokens if ``None``), L2-normalised: ``[batch, d]`` (float32; float64
    stays float64)."""
    h = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
    if attention_mask is None:
        pooled = h.mean(1)  # [batch, d]
    else:
        w = attention_mask.to(device=h.device, dtype=h.dtype)[..., None]  # [batch, pos, 1]
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # [batch, d]
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class EmbeddingCosine(Metric):
    """Cosine distance of the mean-pooled sentence embedding to the clean run's (0 = unchanged,
    1 = orthogonal, 2 = opposite), one score per example."""

    name: str = "embed_cos"
    reads: str = "embedding"
    needs_clean: bool = True

    def __call__(self, logits: torch.Tensor, batch: Batch, clean: torch.Tensor | None = None):
        if logits.ndim != 3:
            raise ConfigError(
                f"metric {self.name!r} reads a bare model's final hidden state [batch, pos, "
                f"d_model], got a tensor of shape {tuple(logits.shape)}"
            )
        if clean is None or clean.shape != logits.shape:
            raise ConfigError(
                f"metric {self.name!r} compares with the clean run's hidden state of the same "
                "shape; score it through headlab.evaluate / run_plans, which pass it"
            )
        u = sentence_embedding(logits, batch.attention_mask)  # [batch, d]
        v = sentence_embedding(clean, batch.attention_mask)  # [batch, d]
        return _example_scores(self.name, 0.5 * (u - v).pow(2).sum(-1))
