"""Counterfactual pairs: clean prompts with position-aligned corrupted twins, from a JSONL file.

What ``--counterfactual FILE`` reads. One JSON object per line:

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupted": "When Amy and Lisa went to the store, Tom gave a drink to",
     "answer": " Mary", "wrong": " John"}

- ``clean`` (text): an evaluation example. The clean sides *are* the run's evaluation examples.
- ``corrupted`` (text): its counterfactual, of the same token length as ``clean`` (a pair of
  different lengths is refused, naming the line and both lengths): patching a head replaces its
  output at every position by the output it has on ``corrupted``.
- ``answer`` (text): the correct next token after ``clean``, one token for the model's tokenizer
  exactly as written (mind the leading space: ``" Mary"``).
- ``wrong`` (text, optional): the competing answer, one token. With ``wrong`` on every line the
  metric is ``logit_diff`` (answer minus wrong at the last position); without it on any line,
  ``answer_logprob``. Give it on every line or on none.

The tokenizer's BOS goes before both sides where it adds one itself (as for the built-in tasks).
Pairs of different lengths from one another are left-padded (each pair's two sides the same
way, so positions stay aligned; the padding is masked). Blank lines, lines that are not JSON
objects, missing or unknown fields are refused with their line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headlab.batch import Batch
from headlab.data.blocks import bos_prefix
from headlab.errors import ConfigError

__all__ = ["FIELDS", "Pairs", "load_pairs", "pairs_from_records", "read_pairs"]

#: the fields of one line, and whether each is required
FIELDS = {"clean": True, "corrupted": True, "answer": True, "wrong": False}
_SHOWN = 5  # at most this many offending lines are listed in one error


@dataclass(frozen=True, eq=False)
class Pairs:
    """Clean examples with their position-aligned counterfactuals.

    Attributes:
        clean: the examples (``input_ids``, ``answer_pos`` at the last position, ``correct``,
            ``wrong`` when given; ``attention_mask`` when pairs differ in length).
        corrupted: the counterfactual of each example, position-aligned, with the clean
            example's answer fields (it is scored as the example it replaces).
        metric: ``logit_diff`` (with ``wrong``) or ``answer_logprob``.
        lines: the line number of every pair in its file (1-based).
    """

    clean: Batch
    corrupted: Batch
    metric: str
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.clean)


def read_pairs(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, str]]]:
    """The records of a pairs file as ``(line number, record)``, each checked for its fields.

    Raises:
        ConfigError: no such file; not UTF-8; a blank line, invalid JSON, a value that is not an
            object, a missing, unknown or non-text field (naming the line); no pairs at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--counterfactual {path}: no such file; give a JSONL file of clean/corrupted pairs "
            '(one {"clean": ..., "corrupted": ..., "answer": ...} per line) or \'builtin\''
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None
    records = []
    lines = text.rstrip().split("\n") if text.strip() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ConfigError(f"{path} line {number} is empty; remove it (one pair per line)")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                "each line must be one JSON object"
            ) from None
        records.append((number, _checked(value, f"{path} line {number}")))
    if not records:
        raise ConfigError(f"{path} holds no pairs; write one JSON object per line")
    return records


def _checked(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is a JSON {type(value).__name__}, not an object {{...}}")
    fields = ", ".join(FIELDS)
    unknown = [k for k in value if k not in FIELDS]
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {', '.join(unknown)} (fields: {fields})")
    missing = [k for k, required in FIELDS.items() if required and k not in value]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} (fields: {fields})")
    for key, text in value.items():
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{where}: {key} must be non-empty text, got {text!r}")
    return value


def _answer_token(tokenizer: Any, word: str) -> int | None:
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def _pieces(tokenizer: Any, word: str) -> list[str]:
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    return [tokenizer.decode([i]) for i in ids]


def _listed(problems: list[str]) -> str:
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "; ".join(problems[:_SHOWN]) + more


def pairs_from_records(
    records: list[tuple[int, dict[str, str]]],
    tokenizer: Any,
    *,
    source: str = "pairs",
    prepend_bos: bool | None = None,
) -> Pairs:
    """Tokenize checked records (:func:`read_pairs`) into :class:`Pairs`.

    Raises:
        ConfigError: answers that are not single tokens (named, with their pieces); pairs whose
            sides differ in token length (line and both lengths); ``wrong`` on some lines only.
    """
    with_wrong = [n for n, r in records if "wrong" in r]
    if with_wrong and len(with_wrong) != len(records):
        lacking = [str(n) for n, r in records if "wrong" not in r]
        raise ConfigError(
            f"{source}: lines {', '.join(lacking[:_SHOWN])} lack 'wrong' while others have it; "
            "give a wrong answer on every line (logit_diff) or on none (answer_logprob)"
        )
    bad_answers = []
    for number, r in records:
        for key in ("answer", "wrong"):
            if key in r and _answer_token(tokenizer, r[key]) is None:
                pieces = _pieces(tokenizer, r[key])
                bad_answers.append(
                    f"line {number} {key} {r[key]!r} is {len(pieces)} tokens {pieces}"
                )
    if bad_answers:
        raise ConfigError(
            f"{source}: answers must be single tokens for this tokenizer: {_listed(bad_answers)}. "
            "Use words that are one token (often with a leading space, ' Mary')"
        )
    prefix = bos_prefix(tokenizer, prepend_bos)
    clean = [prefix + list(tokenizer(r["clean"], add_special_tokens=False)["input_ids"])
             for _, r in records]  # fmt: skip
    corrupted = [prefix + list(tokenizer(r["corrupted"], add_special_tokens=False)["input_ids"])
                 for _, r in records]  # fmt: skip
    uneven = [
        f"line {n}: clean {len(a)} tokens, corrupted {len(b)}"
        for (n, _), a, b in zip(records, clean, corrupted, strict=True)
        if len(a) != len(b)
    ]
    if uneven:
        raise ConfigError(
            f"{source}: the two sides of a pair must have the same token length (patching is "
            f"position by position): {_listed(uneven)}. Reword the corrupted side (e.g. swap in "
            "names or words that are one token each)"
        )
    answers = {"correct": [_answer_token(tokenizer, r["answer"]) for _, r in records]}
    if with_wrong:
        answers["wrong"] = [_answer_token(tokenizer, r["wrong"]) for _, r in records]
    if with_wrong:
        pairs = zip(records, answers["correct"], answers["wrong"], strict=True)
        same = [str(n) for (n, _), right, wrong in pairs if right == wrong]
        if same:
            raise ConfigError(
                f"{source}: lines {', '.join(same[:_SHOWN])} give the same token as answer and "
                "wrong; the logit difference would be 0: give two different answers"
            )
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    clean_batch = _left_padded(clean, pad, answers)
    cf_batch = _left_padded(corrupted, pad, answers)
    metric = "logit_diff" if with_wrong else "answer_logprob"
    return Pairs(clean_batch, cf_batch, metric, tuple(n for n, _ in records))


def _left_padded(rows: list[list[int]], pad: int, answers: dict[str, list[int | None]]) -> Batch:
    """Rows left-padded to one length (an ``attention_mask`` only when lengths differ), the
    answer read at the last position."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
    mask = None
    if any(len(r) != length for r in rows):
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return Batch(
        input_ids=ids,  # [batch, pos]
        target_mask=torch.zeros_like(ids, dtype=torch.bool),
        attention_mask=mask,
        answer_pos=torch.full((len(rows),), length - 1, dtype=torch.long),
        **{k: torch.tensor(v, dtype=torch.long) for k, v in answers.items()},
    )


def load_pairs(
    path: str | os.PathLike[str], tokenizer: Any, *, prepend_bos: bool | None = None
) -> Pairs:
    """The pairs of a JSONL file (module docstring), tokenized and checked for ``tokenizer``."""
    return pairs_from_records(
        read_pairs(path), tokenizer, source=str(path), prepend_bos=prepend_bos
    )
