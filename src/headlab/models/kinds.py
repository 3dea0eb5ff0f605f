"""What a model reads and what it returns: images or tokens (:func:`is_vision`), logits from a
head or only its final hidden state (:func:`is_bare`)."""

from __future__ import annotations

from torch import nn

__all__ = ["is_bare", "is_vision"]


def is_vision(model: nn.Module) -> bool:
    """Whether ``model`` reads ``pixel_values`` (a ViT) rather than token ids."""
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def is_bare(model: nn.Module) -> bool:
    """Whether ``model`` is a bare Hugging Face model (``BertModel``, ``GPT2Model`` ...): no LM
    or classification head, so it returns the final hidden state instead of logits. A model with
    a head holds its bare model as ``model.base_model``; a bare model is its own."""
    return getattr(model, "base_model", None) is model
