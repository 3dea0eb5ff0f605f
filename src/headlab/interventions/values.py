"""The interventions: frozen values that say what the selected activations become.

:class:`Zero`, :class:`Scale` and :class:`Gate` read only their input; :class:`Mean`,
:class:`Median`, :class:`Peak` and :class:`Resample` read activation statistics; :class:`Patch`
reads :class:`Activations` recorded on a counterfactual input. :func:`intervention_from_name`
parses the method names the command line and the tables use (``zero``, ``peak:hist``,
``peak:kde``, ``scale:-1`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from headlab.defaults import DEFAULT_KDE_BANDWIDTH
from headlab.errors import ConfigError
from headlab.interventions.base import Intervention, Selection, StatsSource, current_offset

__all__ = [
    "Activations",
    "Gate",
    "Mean",
    "Median",
    "Patch",
    "Peak",
    "Resample",
    "Scale",
    "Zero",
    "intervention_from_name",
]


def _const(x: torch.Tensor, sel: Selection, value: torch.Tensor) -> torch.Tensor:
    # value: [head, d_head] -> [head, neuron] -> broadcast to x: [batch, pos, head, neuron]
    v = value.to(device=x.device, dtype=x.dtype)[sel.heads.to(x.device)][:, sel.neurons]
    return v.expand_as(x).clone()


def _need(stats: StatsSource | None, iv: Intervention) -> StatsSource:
    if stats is None:
        raise ConfigError(
            f"{type(iv).__name__} ablation needs activation statistics; collect them with "
            "headlab.collect_stats(model, batch) and pass stats=... to intervene()"
        )
    return stats


@dataclass(frozen=True)
class Zero(Intervention):
    """Replace the activations with 0."""

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        return torch.zeros_like(x)


@dataclass(frozen=True)
class Mean(Intervention):
    """Replace each neuron with its mean over the statistics data (all positions pooled)."""

    needs = "mean"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        return _const(x, sel, _need(stats, self).constant("mean", sel.layer))


@dataclass(frozen=True)
class Median(Intervention):
    """Replace each neuron with its median (from the statistics histogram)."""

    needs = "median"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        return _const(x, sel, _need(stats, self).constant("median", sel.layer))


@dataclass(frozen=True)
class Peak(Intervention):
    """Replace each neuron with the mode of its activation distribution.

    Attributes:
        estimator: ``None``, the statistics' own (:attr:`headlab.StatsConfig.peak_estimator`:
            ``"kde"`` for statistics collected now, ``"hist"`` for files written before the
            peak convergence study, so old runs resume unchanged); ``"hist"`` (centre of the
            fullest histogram bin; bins and range are set when the statistics are collected); or
            ``"kde"`` (Gaussian kernel density on the histogram). A bandwidth other than the
            default implies ``"kde"``.
        bandwidth: KDE kernel width as a fraction of each neuron's standard deviation
            (``scipy.stats.gaussian_kde``'s ``bw_method`` convention).
    """

    estimator: str | None = None
    bandwidth: float = DEFAULT_KDE_BANDWIDTH
    needs = "peak"

    def __post_init__(self) -> None:
        if self.estimator not in (None, "hist", "kde"):
            raise ConfigError(f"Peak estimator must be 'hist' or 'kde', got {self.estimator!r}")
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ConfigError(f"Peak bandwidth must be a positive number, got {self.bandwidth}")
        if self.estimator is None and self.bandwidth != DEFAULT_KDE_BANDWIDTH:
            object.__setattr__(self, "estimator", "kde")  # only a KDE has a bandwidth

    @property
    def label(self) -> str:
        if self.estimator is None:
            return "peak"
        return "peak:hist" if self.estimator == "hist" else f"peak:kde:{self.bandwidth:g}"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        options: dict[str, float | str] = {"bandwidth": self.bandwidth}
        if self.estimator is not None:
            options["estimator"] = self.estimator
        return _const(x, sel, _need(stats, self).constant("peak", sel.layer, **options))


@dataclass(frozen=True)
class Resample(Intervention):
    """Replace with the activation at the same position from a different input.

    The donor inputs are the statistics' reservoir (inputs from the statistics split, disjoint
    from evaluation). Example ``b`` gets donor ``perm[b % n]`` of a permutation drawn from
    ``seed``, ``b`` counted across sub-batches (see :func:`example_offset`); the same donor
    serves every layer of one forward.
    """

    seed: int = 0
    needs = "reservoir"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        res = _need(stats, self).reservoir(sel.layer)  # [n_inputs, pos, head, d_head]
        n, res_len = res.shape[0], res.shape[1]
        max_pos = int(sel.positions.max()) + 1
        if max_pos > res_len:
            raise ConfigError(
                f"resample ablation needs donor activations at position {max_pos - 1}, but the "
                f"statistics reservoir holds sequences of length {res_len}; collect statistics "
                "on blocks at least as long as the evaluated ones"
            )
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen)
        donors = perm[(current_offset() + torch.arange(x.shape[0])) % n]
        src = res[donors.to(res.device)]  # [batch, pos, head, d_head]
        return src[sel.index()].to(device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class Scale(Intervention):
    """Multiply the activations by ``alpha`` (any real: -1 flips, 0 removes, 5 amplifies)."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.alpha)):
            raise ConfigError(f"Scale alpha must be a finite number, got {self.alpha}")

    @property
    def label(self) -> str:
        return f"scale:{self.alpha:g}"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        return x * self.alpha


@dataclass(frozen=True, eq=False)
class Activations:
    """Per-layer head outputs recorded from one batch: ``layer -> [batch, pos, head, d_head]``."""

    by_layer: Mapping[int, torch.Tensor]

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.by_layer:
            raise ConfigError(
                f"no recorded activations for layer {layer}; recorded layers: "
                f"{sorted(self.by_layer)}"
            )
        return self.by_layer[layer]

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace with position-aligned activations recorded on a counterfactual input.

    ``source`` comes from :func:`headlab.record` on a batch with the same number of examples (or
    one example, broadcast) and the same sequence length.
    """

    source: Activations = field(repr=False)

    @property
    def label(self) -> str:
        return "patch"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        src = self.source[sel.layer]  # [batch, pos, head, d_head]
        start = current_offset()
        if src.shape[0] != 1:
            if src.shape[0] < start + x.shape[0]:
                raise ConfigError(
                    f"patch source has {src.shape[0]} examples but the patched batch needs "
                    f"{start + x.shape[0]}; record the counterfactual on a batch of the same size"
                )
            src = src[start : start + x.shape[0]]
        if sel.positions.numel() and int(sel.positions.max()) >= src.shape[1]:
            raise ConfigError(
                f"patch source has {src.shape[1]} positions, too few for position "
                f"{int(sel.positions.max())}; counterfactual inputs must be position-aligned"
            )
        out = src[sel.index()].to(device=x.device, dtype=x.dtype)
        return out.expand_as(x).clone()


@dataclass(frozen=True, eq=False)
class Gate(Intervention):
    """Multiply by a (possibly learnable) gate: one value per selected head, or per neuron.

    ``values`` has shape ``[head]`` or ``[head, neuron]`` matching the site's selection; gradients
    flow through it, so gate fitting builds a Gate from its parameters at every step.
    """

    values: torch.Tensor = field(repr=False)

    @property
    def label(self) -> str:
        return "gate"

    def apply(self, x: torch.Tensor, sel: Selection, stats: StatsSource | None) -> torch.Tensor:
        g = self.values.to(device=x.device, dtype=x.dtype)
        n_h, n_n = x.shape[2], x.shape[3]
        if g.shape == (n_h,):
            return x * g[:, None]
        if g.shape == (n_h, n_n):
            return x * g
        raise ConfigError(
            f"Gate values have shape {tuple(g.shape)}; this site selects {n_h} heads and {n_n} "
            f"neurons per head, so use shape ({n_h},) or ({n_h}, {n_n})"
        )


_NAMED = {"zero": Zero, "mean": Mean, "median": Median, "peak": Peak, "resample": Resample}


def intervention_from_name(name: str) -> Intervention:
    """Parse a method name: ``zero``, ``mean``, ``median``, ``peak`` (the statistics' own
    estimator: a KDE for statistics collected now), ``peak:hist``, ``peak:kde``,
    ``peak:kde:0.2``, ``resample``, ``resample:SEED``, ``scale:ALPHA``."""
    text = name.strip()
    head, _, rest = text.partition(":")
    try:
        if head == "scale":
            if not rest:
                raise ValueError
            return Scale(float(rest))
        if head == "peak" and rest:
            est, _, bw = rest.partition(":")
            return Peak(estimator=est, bandwidth=float(bw) if bw else DEFAULT_KDE_BANDWIDTH)
        if head == "resample" and rest:
            return Resample(seed=int(rest))
        if head in _NAMED and not rest:
            return _NAMED[head]()
    except ValueError:
        pass
    raise ConfigError(
        f"unknown method {name!r}; use zero, mean, median, peak, peak:hist, peak:kde[:BW], "
        "resample[:SEED] or scale:ALPHA (e.g. scale:-1, scale:0.5, scale:5)"
    )
