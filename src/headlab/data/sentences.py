"""Token blocks as an encoder reads a sentence: ``[CLS] ... [SEP]``.

:func:`~headlab.data.blocks.make_blocks` cuts a corpus into plain token windows (with BOS where
the tokenizer adds one). A BERT-style sentence encoder (``--model minilm``) is trained on inputs
that start with its classification token and end with its separator, and its sentence embedding
is the mean over all of them, so :func:`as_sentences` puts those two tokens in the first and last
column of every block (the block keeps its length; its first and last corpus tokens make room).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from headlab.batch import Batch
from headlab.errors import ConfigError

__all__ = ["as_sentences"]


def as_sentences(batch: Batch, tokenizer: Any) -> Batch:
    """``batch`` with ``tokenizer``'s CLS token in column 0 and its SEP token in the last column
    (neither is a target); a tokenizer without both is refused."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} has no CLS and SEP tokens to frame a sentence with; "
            "an encoder without them cannot be scored by embed_cos from the command line"
        )
    if batch.seq_len < 3:
        raise ConfigError("a sentence needs CLS, one token and SEP: use --seq-len 3 or more")
    ids = batch.input_ids.clone()  # [batch, pos]
    ids[:, 0], ids[:, -1] = cls, sep
    mask = None
    if batch.target_mask is not None:
        mask = batch.target_mask.clone()
        mask[:, 0] = mask[:, -1] = False
    return replace(batch, input_ids=ids, target_mask=mask)
