"""Concepts for steering: a word list, prompts that select heads, and held-out prompts.

A :class:`Concept` names a set of words (``colours``: red, green ...), ``select_prompts`` on which
heads are scored (they invite the concept at their last token; they may contain concept words),
and held-out ``prompts`` to generate from (they invite the concept but contain none of its words).

Words become tokens with :func:`concept_tokens`: for each word the forms ``" word"``, ``"word"``,
``" Word"`` and ``"Word"`` are tried and every form that is one token is kept (all of them become
dictionary atoms). A word with no single-token form is named in a warning and represented by the
first token of ``" word"`` (``multi="first"``, the default), or refused (``multi="refuse"``).

Concept frequency (:func:`concept_rate`) is counted on *words*: the generated text is split into
runs of letters and single digits (``"25"`` is two words, as SmolLM2's tokenizer splits digits),
lower-cased, and a word counts when it equals one of the concept's words (so "reddish" does not
count, "Red" does). The rate is concept words / all words. ``numbers`` lists number words and
the digits 0-9: SmolLM2-135M writes most numbers in digits.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.errors import ConfigError

__all__ = [
    "CONCEPTS",
    "Concept",
    "ConceptTokens",
    "concept_counts",
    "concept_rate",
    "concept_tokens",
    "get_concept",
    "words_of",
]

_WORD = re.compile(r"[A-Za-z]+|[0-9]")  # a word: a run of letters, or one digit


@dataclass(frozen=True)
class Concept:
    """A concept: its words, head-selection prompts and held-out generation prompts."""

    name: str
    words: tuple[str, ...]
    prompts: tuple[str, ...]
    select_prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        words = tuple(w.strip().lower() for w in self.words if w.strip())
        if not words:
            raise ConfigError(f"concept {self.name!r} has no words; give at least one word")
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad:
            raise ConfigError(
                f"concept words must be single words of letters (or single digits), got {bad}; "
                "split phrases into words (concept frequency is counted word by word)"
            )
        object.__setattr__(self, "words", tuple(dict.fromkeys(words)))
        for field in ("prompts", "select_prompts"):
            value = tuple(p for p in getattr(self, field) if p.strip())
            if not value:
                raise ConfigError(f"concept {self.name!r} has no {field}; give at least one")
            object.__setattr__(self, field, value)

    def with_prompts(self, prompts: Sequence[str]) -> Concept:
        """The same concept with other held-out generation prompts."""
        return Concept(self.name, self.words, tuple(prompts), self.select_prompts)


_COLOUR_WORDS = (
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black",
    "white", "grey", "gray", "gold", "silver", "turquoise", "navy", "indigo", "lavender", "scarlet",
)  # fmt: skip
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million", "billion", "dozen",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)  # fmt: skip

_COLOURS = Concept(
    name="colours",
    words=_COLOUR_WORDS,
    prompts=(
        "The walls of the old house were painted",
        "She wore a beautiful dress that was",
        "As the sun went down, the sky turned",
        "His new car is a shiny",
        "In autumn the leaves on the trees become",
        "For the party they filled the room with balloons that were",
        "The cat had soft fur that was",
        "The petals of the flowers in her garden were",
        "The flag has three stripes:",
        "He painted the fence a bright shade of",
        "On a calm summer day the sea looks",
        "The artist mixed the paints on her palette until they were",
        "The ripe bananas on the kitchen table were",
        "The tulips in the park bloomed in shades of",
        "When the traffic light turned",
        "The curtains in the bedroom were a deep",
        "My grandmother knitted me a scarf that was",
        "The little boat on the lake was painted",
        "Her eyes were a striking shade of",
        "The bird that landed on the window had feathers that were",
    ),
    select_prompts=(
        "The colour of fresh grass is",
        "Snow is usually",
        "On a clear day the sky is",
        "Ripe tomatoes are",
        "Coal is",
        "The colour of blood is",
        "Lemons are",
        "The mixture of red and white paint makes",
        "A mixture of blue and yellow paint makes",
        "Her favourite colour is",
        "He bought a pair of shoes in",
        "The sports car was painted bright",
        "The leaves turned from green to",
        "The night sky is",
        "The colour of chocolate is",
        "Clouds on a sunny day are",
    ),
)

_NUMBERS = Concept(
    name="numbers",
    words=_NUMBER_WORDS,
    prompts=(
        "The farmer counted his sheep and found that he had",
        "The recipe says that you need",
        "We waited at the station for",
        "The old castle was built more than",
        "The team scored",
        "She has lived in this town for",
        "The ticket for the concert cost",
        "There are many students in the class, about",
        "The journey from the city to the coast takes",
        "He bought a box of eggs and used",
        "The library owns more than",
        "At the market she paid for the apples with",
        "The marathon runners had to cover",
        "Our house has",
        "The children collected shells on the beach, and in the end they had",
        "The meeting was moved back by",
        "The spider has",
        "The company hired",
        "The baby was born weighing",
        "Last year the village had a population of",
    ),
    select_prompts=(
        "A week has seven days, and a year has twelve",
        "Two plus two equals",
        "A triangle has",
        "The number after nine is",
        "A dozen eggs means",
        "Half of ten is",
        "Most people have ten fingers and",
        "A century is a period of one",
        "The spider has eight legs and the insect has",
        "He counted: one, two, three,",
        "There are sixty minutes in one hour and sixty seconds in one",
        "The twins celebrated their birthday; they turned",
        "A bicycle has",
        "The hotel has more than a",
        "She waited for almost",
        "The answer to three times three is",
    ),
)

#: built-in concepts by name
CONCEPTS: dict[str, Concept] = {c.name: c for c in (_COLOURS, _NUMBERS)}


def words_of(text_or_path: str) -> list[str]:
    """Words from a comma-separated list (``"red,green"``) or a file (one word a line, or
    comma-separated)."""
    path = Path(text_or_path)
    text = path.read_text() if path.is_file() else text_or_path
    return [w.strip() for w in re.split(r"[,\n]", text) if w.strip()]


def get_concept(
    name_or_words: str | Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    select_prompts: Sequence[str] | None = None,
    name: str | None = None,
) -> Concept:
    """A built-in concept by name, or a concept made of the given words.

    Args:
        name_or_words: ``"colours"``, ``"numbers"``, a comma list of words (``"red,green"``),
            a file of words, or a list of words.
        prompts: held-out generation prompts (required for a custom word list unless the words
            are a subset of a built-in concept, whose prompts are then used).
        select_prompts: head-selection prompts (default: as for ``prompts``).
    """
    if isinstance(name_or_words, str) and name_or_words in CONCEPTS:
        base = CONCEPTS[name_or_words]
        return Concept(
            base.name,
            base.words,
            tuple(prompts) if prompts is not None else base.prompts,
            tuple(select_prompts) if select_prompts is not None else base.select_prompts,
        )
    words = words_of(name_or_words) if isinstance(name_or_words, str) else list(name_or_words)
    if isinstance(name_or_words, str) and len(words) == 1 and not Path(name_or_words).is_file():
        raise ConfigError(
            f"unknown concept {name_or_words!r}; built-in concepts: {', '.join(CONCEPTS)}; or "
            "give a comma-separated word list (e.g. red,green,blue) or a file of words"
        )
    lowered = {w.strip().lower() for w in words}
    home = next((c for c in CONCEPTS.values() if lowered <= set(c.words)), None)
    if prompts is None and home is None:
        raise ConfigError(
            "a custom concept needs held-out prompts to generate from: pass --prompts FILE (one "
            "prompt a line) or prompts=[...]"
        )
    gen = tuple(prompts) if prompts is not None else home.prompts  # type: ignore[union-attr]
    if select_prompts is not None:
        sel = tuple(select_prompts)
    else:
        sel = home.select_prompts if home is not None else gen
    return Concept(name or (home.name if home else "custom"), tuple(words), gen, sel)


@dataclass(frozen=True)
class ConceptTokens:
    """How a concept's words map to tokens.

    Attributes:
        table: one row per (word, form) kept: ``word, form, token_id, single`` (``single`` is
            False for a first-token stand-in).
        token_ids: the distinct token ids (the dictionary atoms), in table order.
        multi_token: words with no single-token form.
    """

    table: pd.DataFrame
    token_ids: tuple[int, ...]
    multi_token: tuple[str, ...]


def _forms(word: str) -> list[str]:
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([" " + word, word, " " + cap, cap]))


def concept_tokens(tokenizer: Any, words: Sequence[str], *, multi: str = "first") -> ConceptTokens:
    """Map ``words`` to single tokens (every single-token form of each word is kept).

    Args:
        multi: what to do with words that have no single-token form: ``"first"`` warns naming
            them and uses the first token of ``" word"``; ``"refuse"`` raises ConfigError.
    """
    if multi not in ("first", "refuse"):
        raise ConfigError(f"multi must be 'first' or 'refuse', got {multi!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    rows, missing = [], []
    for word in words:
        found = False
        for form in _forms(word):
            ids = list(tokenizer(form, add_special_tokens=False)["input_ids"])
            if len(ids) == 1 and ids[0] != unk:
                rows.append((word, form, ids[0], True))
                found = True
        if not found:
            missing.append(word)
    if missing and multi == "refuse":
        raise ConfigError(
            f"these concept words are not single tokens in any form (' word', 'word', ' Word', "
            f"'Word'): {', '.join(missing)}; remove them, or allow first-token stand-ins "
            "(multi='first', CLI --multi-token first)"
        )
    if missing:
        warnings.warn(
            f"concept words with no single-token form use the first token of ' word' instead: "
            f"{', '.join(missing)} (pass multi='refuse' / --multi-token refuse to stop instead)",
            UserWarning,
            stacklevel=2,
        )
        for word in missing:
            ids = list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
            if ids and ids[0] != unk:
                rows.append((word, " " + word, ids[0], False))
    table = pd.DataFrame(rows, columns=["word", "form", "token_id", "single"])
    if table.empty:
        raise ConfigError(f"none of the concept words {list(words)} maps to a known token")
    ids = tuple(dict.fromkeys(int(t) for t in table["token_id"]))
    return ConceptTokens(table, ids, tuple(missing))


def concept_counts(texts: Sequence[str], words: Sequence[str]) -> list[tuple[int, int]]:
    """Per text: ``(concept words, all words)``, a word being a run of letters or one digit,
    matched case-insensitively against ``words``."""
    vocab = {w.lower() for w in words}
    out = []
    for text in texts:
        found = [w.lower() for w in _WORD.findall(text)]
        out.append((sum(w in vocab for w in found), len(found)))
    return out


def concept_rate(texts: Sequence[str], words: Sequence[str]) -> tuple[float, list[float], int]:
    """Concept frequency of generated ``texts``: ``(pooled rate, per-text rates, total words)``.

    The pooled rate is concept words / all words over every text (NaN if no words at all); a
    text with no words has rate NaN. The counts are :func:`concept_counts`.
    """
    counts = concept_counts(texts, words)
    hits, total = sum(k for k, _ in counts), sum(n for _, n in counts)
    per = [k / n if n else float("nan") for k, n in counts]
    return (hits / total if total else float("nan")), per, total
