"""Where interventions go: :class:`Site` and :class:`Plan`.

A :class:`Site` picks heads of one layer, optionally only some of their neurons (coordinates of
``d_head``) and only some positions. A :class:`Plan` pairs sites with interventions for one
forward; different heads may get different interventions, but no coordinate may be claimed twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from headlab.errors import ConfigError
from headlab.interventions.base import Intervention

__all__ = ["Plan", "Site"]


def _int_tuple(values: Iterable[int] | int | None, what: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{what} must be integers, got {v!r} ({type(v).__name__})")
        out.append(int(v))
    if not out:
        raise ConfigError(f"{what} is empty; use None to select all {what}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} has duplicates: {out}")
    return tuple(out)


@dataclass(frozen=True)
class Site:
    """Heads of one layer, optionally restricted to some neurons and some positions.

    Attributes:
        layer: layer index.
        heads: query-head indices within the layer.
        neurons: coordinates of ``d_head`` within each selected head (``None``: all).
        positions: token positions (``None``: all; negative counts from the end).
    """

    layer: int
    heads: tuple[int, ...]
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(f"Site.layer must be an int, got {self.layer!r}")
        object.__setattr__(self, "heads", _int_tuple(self.heads, "heads"))
        object.__setattr__(self, "neurons", _int_tuple(self.neurons, "neurons"))
        object.__setattr__(self, "positions", _int_tuple(self.positions, "positions"))


def _site_of(key: object) -> Site:
    if isinstance(key, Site):
        return key
    if (
        isinstance(key, tuple)
        and len(key) == 2
        and all(isinstance(k, int) and not isinstance(k, bool) for k in key)
    ):
        return Site(layer=key[0], heads=(key[1],))
    raise ConfigError(
        f"a plan is keyed by (layer, head) pairs of ints or by Site(...) values; got {key!r}. "
        "Example: Plan.of({(3, 5): Zero(), Site(4, heads=(0, 1), neurons=(7,)): Peak()})"
    )


@dataclass(frozen=True)
class Plan:
    """Which interventions go where, for one forward pass. Empty plan: the clean model."""

    entries: tuple[tuple[Site, Intervention], ...] = ()

    def __post_init__(self) -> None:
        for item in self.entries:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ConfigError(f"Plan entries are (Site, Intervention) pairs, got {item!r}")
            site, iv = item
            if not isinstance(site, Site):
                _site_of(site)  # raises the helpful message
            if not isinstance(iv, Intervention):
                raise ConfigError(
                    f"{iv!r} is not an Intervention; use Zero(), Mean(), Peak(), Median(), "
                    "Resample(), Scale(alpha), Patch(source) or Gate(values)"
                )
        self._check_overlaps()

    @classmethod
    def of(cls, spec: Mapping[object, Intervention]) -> Plan:
        """Build from ``{(layer, head) or Site: Intervention}``."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"Plan.of takes a mapping of sites to interventions, got {spec!r}")
        return cls(tuple((_site_of(k), v) for k, v in spec.items()))

    @classmethod
    def heads(cls, heads: Iterable[tuple[int, int]], intervention: Intervention) -> Plan:
        """The same intervention on every ``(layer, head)`` in ``heads``, grouped by layer."""
        by_layer: dict[int, list[int]] = {}
        for key in heads:
            site = _site_of(tuple(key) if isinstance(key, list) else key)
            by_layer.setdefault(site.layer, []).extend(site.heads)
        return cls(tuple((Site(ly, tuple(hs)), intervention) for ly, hs in by_layer.items()))

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.entries + other.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def layers(self) -> list[int]:
        return sorted({site.layer for site, _ in self.entries})

    def needs(self) -> set[str]:
        """The statistics this plan's interventions read."""
        return {iv.needs for _, iv in self.entries if iv.needs is not None}

    def _check_overlaps(self) -> None:
        claimed: dict[tuple[int, int], list[Site]] = {}
        for site, _ in self.entries:
            for h in site.heads:
                for other in claimed.get((site.layer, h), []):
                    if _overlap(site.neurons, other.neurons) and _overlap(
                        site.positions, other.positions
                    ):
                        raise ConfigError(
                            f"two interventions in one plan claim the same activations of layer "
                            f"{site.layer} head {h}; give each coordinate at most one "
                            "intervention (split by neurons or positions)"
                        )
                claimed.setdefault((site.layer, h), []).append(site)

    def check(self, n_layers: int, n_heads: int, d_head: int) -> None:
        """Raise a clear error if any site is outside a model of this shape."""
        for site, _ in self.entries:
            if not 0 <= site.layer < n_layers:
                raise ConfigError(
                    f"layer {site.layer} is out of range: this model has layers 0..{n_layers - 1}"
                )
            for h in site.heads:
                if not 0 <= h < n_heads:
                    raise ConfigError(
                        f"head {h} is out of range in layer {site.layer}: this model has heads "
                        f"0..{n_heads - 1}"
                    )
            for n in site.neurons or ():
                if not 0 <= n < d_head:
                    raise ConfigError(
                        f"neuron {n} is out of range: heads of this model have d_head = {d_head} "
                        f"(neurons 0..{d_head - 1})"
                    )

    def for_layer(self, layer: int) -> list[tuple[Site, Intervention]]:
        return [(s, iv) for s, iv in self.entries if s.layer == layer]


def _overlap(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    return a is None or b is None or bool(set(a) & set(b))
