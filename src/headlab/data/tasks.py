"""Built-in tasks, generated on the fly for any tokenizer (nothing is downloaded).

- ``induction``: ``r r`` (after BOS where the tokenizer uses one) with ``r`` distinct random
  ordinary tokens; the second copy is predictable by copying. Metric ``ce`` on the second copy
  (from its second token on).
- ``names``: indirect-object identification, e.g. "When Mary and John went to the store, John
  gave a drink to" -> " Mary" (correct) against " John" (wrong). Metric ``logit_diff``.
- ``capitals``: factual recall, "The capital of France is" -> " Paris" against another country's
  capital. Metric ``answer_logprob`` (``answer_acc`` and ``logit_diff`` also apply).

Every batch has one length (names, places and countries are restricted to single tokens, and only
the templates of the most common token length are kept), so no padding is needed. ``answer_pos``
is the last position; one-position tasks have no next-token targets (``target_mask`` is all
False). The statistics batch comes from the same generator with an independent seed stream.

``names`` and ``capitals`` also build the *minimal pair* of every evaluation example
(:attr:`Task.counterfactual`, what ``patch`` and ``atp:patch`` patch in; ``--counterfactual
builtin``): the same prompt, token for token, with only the words that decide the answer changed.

- ``names``: the ABC counterfactual of IOI work: the same template, place and object with three
  other names, distinct from each other and from the example's two ("When Amy and Lisa went to
  the store, Tom gave a drink to"), so nothing in the prompt points to either answer.
- ``capitals``: the same template with another country: the country whose capital is the
  example's ``wrong`` answer, so patching moves the answer from ``correct`` toward ``wrong``.

The corrupted prompts come from their own seed stream: building them leaves the evaluation
examples unchanged.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from headlab.batch import Batch
from headlab.data.blocks import bos_prefix
from headlab.errors import ConfigError

__all__ = ["PAIRED_TASKS", "TASKS", "Task", "load_task", "ordinary_token_ids"]

MIN_WORDS = 8  # fewest usable names / countries for a task to be meaningful
# induction draws from the lowest-numbered ordinary tokens (BPE ids roughly follow frequency):
# SmolLM2 copies these far better (second-copy CE 1.9 nats) than all 48,637 (3.1 nats).
INDUCTION_VOCAB = 10_000


@dataclass(frozen=True, eq=False)
class Task:
    """A named behaviour: an evaluation batch, a disjoint statistics batch, and its metric.

    ``counterfactual``: the minimal pair of every evaluation example, position-aligned with
    ``eval`` (``names`` and ``capitals``; ``None`` for ``induction``), see the module docstring.
    """

    name: str
    description: str
    eval: Batch
    stats: Batch
    metric: str
    counterfactual: Batch | None = None


#: what a task builder returns: the batch, and its minimal pairs (``None``: the task has none)
Built = tuple[Batch, Batch | None]


def load_task(
    name: str,
    tokenizer: Any,
    *,
    n: int,
    seed: int = 0,
    seq_len: int | None = None,
    prepend_bos: bool | None = None,
) -> Task:
    """Build task ``name`` (one of :data:`TASKS`) with ``n`` evaluation and ``n`` statistics
    examples. ``seq_len`` applies to ``induction`` only (default 2 * 32, plus 1 with BOS).
    ``prepend_bos``: see :func:`headlab.data.blocks.bos_prefix`."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if seq_len is not None and name != "induction":
        raise ConfigError(f"task {name!r} has fixed prompts; seq_len applies only to induction")
    build, description, metric = _BUILDERS[name]
    prefix = bos_prefix(tokenizer, prepend_bos)
    evaluation, counterfactual = build(tokenizer, prefix, n, _rng_seed(name, seed, "eval"), seq_len)
    stats, _ = build(tokenizer, prefix, n, _rng_seed(name, seed, "stats"), seq_len)
    return Task(
        name=name,
        description=description,
        eval=evaluation,
        stats=stats,
        metric=metric,
        counterfactual=counterfactual,
    )


def _rng_seed(task: str, seed: int, part: str) -> int:
    """Independent, platform-stable seed streams for each task, user seed and batch part."""
    return int.from_bytes(hashlib.sha256(f"{task}/{seed}/{part}".encode()).digest()[:8], "big")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_tokens(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    """Words whose leading-space form is one known token (not UNK), mapped to that token id."""
    out = {}
    for word in words:
        ids = _encode(tokenizer, " " + word)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            out[word] = ids[0]
    return out


# --- induction -----------------------------------------------------------------------------------


def ordinary_token_ids(tokenizer: Any, limit: int | None = None) -> torch.Tensor:
    """Ids of ordinary tokens, lowest first (at most ``limit``): not special or added, printable,
    non-blank, and re-encoding to themselves, so random sequences of them are valid text."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(len(tokenizer)) if i not in special]
    keep: list[int] = []
    chunk = 4096
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        texts = tokenizer.batch_decode([[i] for i in part])
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep += [
            i
            for i, text, enc in zip(part, texts, encoded, strict=True)
            if text.strip() and text.isprintable() and list(enc) == [i]
        ]
        if limit is not None and len(keep) >= limit:
            return torch.tensor(keep[:limit], dtype=torch.long)
    return torch.tensor(keep, dtype=torch.long)


def _induction(tokenizer: Any, prefix: list[int], n: int, seed: int, seq_len: int | None) -> Built:
    if seq_len is None:
        seq_len = len(prefix) + 2 * 32
    half, extra = divmod(seq_len - len(prefix), 2)  # an odd leftover becomes one filler token
    if half < 2:
        raise ConfigError(
            f"induction needs seq_len >= {len(prefix) + 4} (a repeated segment of 2+ tokens)"
        )
    candidates = ordinary_token_ids(tokenizer, INDUCTION_VOCAB)
    if len(candidates) < half + extra:
        raise ConfigError(
            f"the tokenizer has {len(candidates)} ordinary tokens, too few for a repeated segment "
            f"of {half}; use a shorter seq_len"
        )
    generator = torch.Generator().manual_seed(seed % 2**63)
    rows = []
    for _ in range(n):
        pick = candidates[torch.randperm(len(candidates), generator=generator)[: half + extra]]
        filler, segment = pick[:extra], pick[extra:]  # distinct tokens: copying is unambiguous
        rows.append(torch.cat([torch.tensor(prefix, dtype=torch.long), filler, segment, segment]))
    ids = torch.stack(rows)  # [batch, pos]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(prefix) + extra + half + 1 :] = True  # second copy, from its 2nd token on
    return Batch(input_ids=ids, target_mask=mask), None


# --- names (indirect object identification) ------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NAMES = _words(
    "Mary John Tom James Dan Sid Martin Amy Lisa Paul Kate Anne Mark Sarah David Michael Robert "
    "Laura Emma Jack Alice Bob Kevin Rose Peter Eric Adam Ben Sam Max Luke Ryan Jane Grace Anna "
    "Julia Helen Karen Susan Linda Nancy Chris Steve Brian George Frank Henry Jason Joseph Lucy "
    "Joe Tim Matt Ruth Rachel Nick Daniel William Richard Thomas Charles Andrew Edward Emily"
)
_PLACES = _words(
    "store garden restaurant school hospital office station park house market beach library "
    "museum church hotel airport"
)
_OBJECTS = _words("drink book ring bone ball computer necklace letter bag gift card coin key cake")
_NAME_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} arrived at the {place}, {S} gave a {object} to",
    "While {A} and {B} were at the {place}, {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {object} to",
    "When {A} and {B} got to the {place}, {S} gave a {object} to",
)


def _names(tokenizer: Any, prefix: list[int], n: int, seed: int, seq_len: int | None) -> Built:
    names = _single_tokens(tokenizer, _NAMES)
    if len(names) < MIN_WORDS:
        raise ConfigError(
            f"names needs at least {MIN_WORDS} first names that the tokenizer encodes as one "
            f"token with a leading space; only {len(names)} do ({sorted(names)})"
        )
    places = list(_single_tokens(tokenizer, _PLACES)) or _PLACES[:1]
    objects = list(_single_tokens(tokenizer, _OBJECTS)) or _OBJECTS[:1]
    first, second = list(names)[:2]
    templates = _same_length(
        tokenizer,
        _NAME_TEMPLATES,
        lambda t: t.format(A=first, B=second, S=second, place=places[0], object=objects[0]),
    )
    rng = random.Random(seed)
    abc = random.Random(f"{seed}/abc")  # the counterfactuals' own stream: eval stays unchanged
    prompts, corrupted, correct, wrong = [], [], [], []
    for i in range(n):
        io, subject = rng.sample(list(names), 2)
        a, b = (io, subject) if i % 2 == 0 else (subject, io)  # ABBA and BABA alternate
        template = rng.choice(templates)
        fill = {"place": rng.choice(places), "object": rng.choice(objects)}
        prompts.append(template.format(A=a, B=b, S=subject, **fill))
        others = abc.sample([x for x in names if x not in (io, subject)], 3)
        corrupted.append(template.format(A=others[0], B=others[1], S=others[2], **fill))
        correct.append(names[io])
        wrong.append(names[subject])
    return _answer_batch(tokenizer, prefix, prompts, correct, wrong, corrupted)


# --- capitals (factual recall) -------------------------------------------------------------------

_CAPITALS = (
    "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Japan:Tokyo China:Beijing Russia:Moscow "
    "Egypt:Cairo Greece:Athens Portugal:Lisbon Ireland:Dublin Austria:Vienna Poland:Warsaw "
    "Norway:Oslo Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Hungary:Budapest "
    "Canada:Ottawa Australia:Canberra Peru:Lima Chile:Santiago Kenya:Nairobi Thailand:Bangkok "
    "Vietnam:Hanoi Indonesia:Jakarta Iran:Tehran Iraq:Baghdad Turkey:Ankara Cuba:Havana "
    "Belgium:Brussels Netherlands:Amsterdam Switzerland:Bern India:Delhi Ukraine:Kyiv "
    "Romania:Bucharest Bulgaria:Sofia Venezuela:Caracas Philippines:Manila Syria:Damascus "
    "Lebanon:Beirut Afghanistan:Kabul Bangladesh:Dhaka Nepal:Kathmandu Scotland:Edinburgh "
    "England:London Wales:Cardiff Serbia:Belgrade Croatia:Zagreb Jamaica:Kingston Qatar:Doha "
    "Argentina:Buenos_Aires Colombia:Bogota Pakistan:Islamabad Nigeria:Abuja Morocco:Rabat"
)
# measured on SmolLM2 (200 prompts each): accuracy 0.68, 0.84, 0.82; "The capital of X is" 0.63
_CAPITAL_TEMPLATES = (
    "The capital city of {country} is",
    "In {country}, the capital is",
    "The official capital of {country} is",
)


def _capitals(tokenizer: Any, prefix: list[int], n: int, seed: int, seq_len: int | None) -> Built:
    pairs = [pair.replace("_", " ").split(":") for pair in _CAPITALS.split()]
    first_token = {country: _encode(tokenizer, " " + city)[0] for country, city in pairs}
    shared = {t for t, count in Counter(first_token.values()).items() if count > 1}
    shared.add(tokenizer.unk_token_id)  # an unknown capital cannot be scored
    encoded = {c: _encode(tokenizer, " " + c) for c, _ in pairs if first_token[c] not in shared}
    lengths = {c: len(ids) for c, ids in encoded.items() if tokenizer.unk_token_id not in ids}
    common = Counter(lengths.values()).most_common(1)[0][0] if lengths else 0
    countries = [c for c, length in lengths.items() if length == common]  # one prompt length
    if len(countries) < MIN_WORDS:
        raise ConfigError(
            f"capitals needs at least {MIN_WORDS} countries of equal token length whose capitals "
            f"start with distinct tokens; this tokenizer leaves {len(countries)}"
        )
    templates = _same_length(
        tokenizer, _CAPITAL_TEMPLATES, lambda t: t.format(country=countries[0])
    )
    rng = random.Random(seed)
    combos = [(c, t) for c in countries for t in templates]
    rng.shuffle(combos)  # eval and stats shuffle independently; n <= len(combos) never repeats
    prompts, corrupted, correct, wrong = [], [], [], []
    for i in range(n):
        country, template = combos[i % len(combos)]
        other = rng.choice([c for c in countries if c != country])
        prompts.append(template.format(country=country))
        corrupted.append(template.format(country=other))  # countries share one token length
        correct.append(first_token[country])
        wrong.append(first_token[other])
    return _answer_batch(tokenizer, prefix, prompts, correct, wrong, corrupted)


# --- shared --------------------------------------------------------------------------------------


def _same_length(tokenizer: Any, templates: Sequence[str], fill: Callable[[str], str]) -> list[str]:
    """The templates of the most common token length (so a batch needs no padding)."""
    lengths = [len(_encode(tokenizer, fill(t))) for t in templates]
    common = Counter(lengths).most_common(1)[0][0]
    return [t for t, length in zip(templates, lengths, strict=True) if length == common]


def _answer_batch(
    tokenizer: Any,
    prefix: list[int],
    prompts: list[str],
    correct: list[int],
    wrong: list[int],
    corrupted: list[str],
) -> Built:
    """The examples with their answers, and their corrupted prompts (the same answers: the
    minimal pair is scored as the example it replaces), all of one token length."""
    rows = [prefix + _encode(tokenizer, p) for p in prompts]
    cf_rows = [prefix + _encode(tokenizer, p) for p in corrupted]
    length = len(rows[0])
    for prompt, row in zip([*prompts, *corrupted], [*rows, *cf_rows], strict=True):
        if len(row) != length:
            raise ConfigError(
                f"prompt {prompt!r} is {len(row)} tokens, not {length} like the others: this "
                "tokenizer merges a name with its neighbours; the task cannot be built for it"
            )
    ids = torch.tensor(rows, dtype=torch.long)  # [batch, pos]
    answers = {
        "target_mask": torch.zeros_like(ids, dtype=torch.bool),
        "answer_pos": torch.full((len(rows),), length - 1, dtype=torch.long),
        "correct": torch.tensor(correct, dtype=torch.long),
        "wrong": torch.tensor(wrong, dtype=torch.long),
    }
    counterfactual = Batch(input_ids=torch.tensor(cf_rows, dtype=torch.long), **answers)
    return Batch(input_ids=ids, **answers), counterfactual


_Builder = Callable[[Any, list[int], int, int, int | None], Built]
_BUILDERS: dict[str, tuple[_Builder, str, str]] = {
    "induction": (_induction, "repeat a random token sequence: [BOS] r r", "ce"),
    "names": (_names, "indirect object: '... John gave a drink to' -> ' Mary'", "logit_diff"),
    "capitals": (
        _capitals,
        "factual recall: 'The capital of France is' -> ' Paris'",
        "answer_logprob",
    ),
}
TASKS: tuple[str, ...] = tuple(_BUILDERS)
#: the tasks that build minimal pairs (:attr:`Task.counterfactual`)
PAIRED_TASKS: tuple[str, ...] = ("names", "capitals")
