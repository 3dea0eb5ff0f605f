"""Sets of heads: the ``(layer, head)`` pairs every analysis takes and returns.

One home for what several commands need: the :data:`Head` type, parsing ``"3.5,10.1"``, checking a
chosen set against a model, grouping by layer, random control sets and the top ``k`` heads of a
table (one row per ``layer, head``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

from headlab.errors import ConfigError
from headlab.models.layout import Layout

__all__ = ["Head", "check_heads", "heads_by_layer", "parse_heads", "random_heads", "top_heads"]

#: one attention head: ``(layer, head)``, both 0-based
Head = tuple[int, int]


def parse_heads(text: str) -> list[Head]:
    """``"3.5,10.1"`` (or ``"3:5,10:1"``) -> ``[(3, 5), (10, 1)]``, checked by
    :func:`check_heads` (not yet against a model).

    Raises:
        ConfigError: empty, malformed, negative or repeated heads.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(
            f"no heads given (got {text!r}); list LAYER.HEAD pairs such as 3.5,10.1, or omit "
            "--heads"
        )
    out = []
    for item in items:
        sep = "." if "." in item else ":"
        try:
            layer, head = (int(x) for x in item.split(sep))
        except ValueError:
            raise ConfigError(
                f"expected LAYER.HEAD pairs separated by commas (e.g. 3.5,10.1), got {item!r}"
            ) from None
        if layer < 0 or head < 0:
            raise ConfigError(f"layer and head must be >= 0, got {item!r}")
        out.append((layer, head))
    return check_heads(out)


def check_heads(heads: Iterable[Sequence[int]], layout: Layout | None = None) -> list[Head]:
    """``heads`` as a list of ``(layer, head)`` integer pairs, in the order given; refused (with
    :class:`ConfigError`) if empty, if a head repeats, if an item is not a pair of integers, or,
    given ``layout``, if a head is not in the model. The one check of a chosen set of heads: the
    analyses, the jobs and the CLI's ``--heads`` all use it."""
    out: list[Head] = []
    seen: set[Head] = set()
    for pair in heads:
        try:
            ly, h = (operator.index(x) for x in pair)
        except (TypeError, ValueError):
            raise ConfigError(
                f"heads must be (layer, head) pairs of integers, e.g. [(3, 5), (10, 1)]; got "
                f"{pair!r}"
            ) from None
        if (ly, h) in seen:
            raise ConfigError(f"head {ly}.{h} is given twice; list each head once")
        if layout is not None:
            try:
                layout.check_head(ly, h)
            except ConfigError as err:
                raise ConfigError(
                    f"{err}; choose heads this model has (layers 0..{layout.n_layers - 1}, heads "
                    f"0..{layout.n_heads - 1})"
                ) from None
        seen.add((ly, h))
        out.append((ly, h))
    if not out:
        raise ConfigError(
            "no heads given; list at least one (layer, head) pair, or pass heads=None (CLI: omit "
            "--heads) for every head"
        )
    return out


def heads_by_layer(layout: Layout, heads: Sequence[Head] | None = None) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` of ``heads`` (default: every head), checked by
    :func:`check_heads` against ``layout``, in the order given."""
    chosen = check_heads(heads, layout) if heads is not None else layout.heads()
    out: dict[int, list[int]] = {}
    for ly, h in chosen:
        out.setdefault(ly, []).append(h)
    return out


def random_heads(
    layout: Layout,
    k: int,
    *,
    seed: int = 0,
    exclude: Sequence[Head] = (),
    pool: Sequence[Head] | None = None,
) -> list[Head]:
    """``k`` random heads from ``pool`` (default: every head) not in ``exclude``, sorted: a
    control set. The same ``seed`` gives the same set."""
    drop = {tuple(h) for h in exclude}
    pool = [
        tuple(h) for h in (pool if pool is not None else layout.heads()) if tuple(h) not in drop
    ]
    if k > len(pool):
        raise ConfigError(f"asked for {k} random heads but only {len(pool)} are available")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return sorted(pool[i] for i in perm[:k].tolist())


def top_heads(table, score: str, k: int, *, where=None) -> list[Head]:
    """The ``k`` heads with the largest ``score`` in ``table`` (rows ``layer, head, score``;
    optionally only rows where the boolean Series ``where`` holds), ties broken by layer, head."""
    sub = table if where is None else table[where]
    if score not in sub.columns:
        raise ConfigError(f"the table has no column {score!r}; it has {list(sub.columns)}")
    sub = sub.sort_values([score, "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(r.layer), int(r.head)) for r in sub.head(k).itertuples()]
