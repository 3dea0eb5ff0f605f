"""Token batches: the unit every metric, statistic and analysis consumes.

Vocabulary used throughout headlab: ``batch`` (examples), ``pos`` (token positions), ``head``
(query heads), ``d_head`` (coordinates of one head's output, the "neurons" of a head).

A :class:`Batch` carries the model inputs together with everything a metric needs to score them:
which tokens count as next-token targets (``target_mask``), and for one-position task metrics the
position to read (``answer_pos``) and the correct / wrong answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from headlab.models.layout import with_position_ids

__all__ = ["Batch"]


@dataclass(frozen=True, eq=False)
class Batch:
    """Inputs of one forward pass plus what the metrics need to score it.

    Attributes:
        input_ids: ``[batch, pos]`` token ids (``None`` for vision models).
        target_mask: ``[batch, pos]`` bool; ``True`` where token ``t`` counts as a next-token target
            (it is predicted from position ``t - 1``). Column 0 is never a target.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding (``None``: all real).
        answer_pos: ``[batch]`` position whose logits a one-position task metric reads.
        correct: ``[batch]`` token id of the correct answer at ``answer_pos``.
        wrong: ``[batch]`` token id of the competing answer (logit difference), or ``None``.
        labels: masked-LM labels ``[batch, pos]`` (-100 = not scored) or class labels ``[batch]``.
        pixel_values: ``[batch, channels, height, width]`` images for vision models.
    """

    input_ids: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    answer_pos: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    wrong: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids is None and self.pixel_values is None:
            raise ValueError("a Batch needs input_ids (text) or pixel_values (images)")
        n = len(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"Batch.{f.name} has {value.shape[0]} rows but the batch has {n} examples"
                )
        ids, tm = self.input_ids, self.target_mask
        if ids is not None and tm is not None and tm.shape != ids.shape:
            raise ValueError(
                f"target_mask shape {tuple(tm.shape)} must equal input_ids shape {tuple(ids.shape)}"
            )

    def __len__(self) -> int:
        main = self.input_ids if self.input_ids is not None else self.pixel_values
        return int(main.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1]) if self.input_ids is not None else 0

    def _map(self, fn) -> Batch:
        return replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Examples ``start:stop`` as a new Batch."""
        return self._map(lambda t: t[start:stop])

    def select(self, index: torch.Tensor) -> Batch:
        """Examples at ``index`` (a 1-D long tensor) as a new Batch."""
        return self._map(lambda t: t[index.to(t.device)])

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device))

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive sub-batches of at most ``size`` examples."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        return [self.slice(i, min(i + size, len(self))) for i in range(0, len(self), size)]

    def model_inputs(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward.

        Pass ``model`` whenever you call it yourself: a left-padded batch (padding before real
        tokens) then also carries the ``position_ids`` that give every row the numbers of the
        same example unpadded (:func:`headlab.models.layout.with_position_ids`). Without
        ``model`` only the batch's own tensors are returned.
        """
        out: dict[str, torch.Tensor] = {}
        if self.input_ids is not None:
            out["input_ids"] = self.input_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        return out if model is None else with_position_ids(model, out)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Stack batches with the same fields along the batch axis."""
        if not batches:
            raise ValueError("cannot concatenate an empty list of batches")
        first = batches[0]
        kw = {}
        for f in fields(first):
            vals = [getattr(b, f.name) for b in batches]
            if all(v is None for v in vals):
                continue
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate batches where only some have {f.name}")
            kw[f.name] = torch.cat(vals, dim=0)
        return Batch(**kw)
