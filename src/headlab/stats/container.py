"""The :class:`Stats` container: per-neuron summaries, peak and median read from the histogram,
the intervention interface (``constant``, ``reservoir``), compatibility checks and safetensors
save/load."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from headlab.errors import ConfigError, StatsMismatchError
from headlab.models.layout import Layout, describe
from headlab.stats.config import StatsConfig

_FORMAT = "headlab-stats/1"


@dataclass(eq=False)
class Stats:
    """Collected statistics; implements what interventions need (``constant``, ``reservoir``).

    Tensors are stacked over layers; ``N = n_heads * d_head`` neurons per layer.
    """

    layout: dict[str, object]
    config: StatsConfig
    tensors: dict[str, torch.Tensor]
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    n_inputs: int = 0
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- shapes ------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return int(self.layout["n_heads"])

    @property
    def d_head(self) -> int:
        return int(self.layout["d_head"])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.n_heads, self.d_head)  # [..., head, d_head]

    # -- per-neuron summaries ([layer, head, d_head]) ------------------------------------------
    @property
    def count(self) -> torch.Tensor:
        return self._heads(self.tensors["count"])

    @property
    def mean(self) -> torch.Tensor:
        return self._heads(self.tensors["mean"].float())

    @property
    def var(self) -> torch.Tensor:
        """Population variance."""
        return self._heads((self.tensors["m2"] / self.tensors["count"].clamp_min(1)).float())

    @property
    def min(self) -> torch.Tensor:
        return self._heads(self.tensors["min"])

    @property
    def max(self) -> torch.Tensor:
        return self._heads(self.tensors["max"])

    def bin_width(self) -> torch.Tensor:
        """Histogram bin width per neuron, ``[layer, head, d_head]``."""
        t = self.tensors
        return self._heads((t["hi"] - t["lo"]) / self.config.bins)

    def peak(self, estimator: str = "hist", bandwidth: float = 0.1) -> torch.Tensor:
        """Mode of every neuron, ``[layer, head, d_head]``."""
        key = ("peak", estimator, bandwidth)
        if key not in self._cache:
            hist = self.tensors["hist"].double()  # [layer, N, bins]
            lo, hi = self.tensors["lo"].double(), self.tensors["hi"].double()
            width = (hi - lo) / self.config.bins
            if estimator == "kde":
                sd = (self.tensors["m2"] / self.tensors["count"].clamp_min(1)).sqrt()
                hist = _smooth(hist, (bandwidth * sd / width).clamp_min(1e-3))
            elif estimator != "hist":
                raise ConfigError(f"peak estimator must be 'hist' or 'kde', got {estimator!r}")
            k = hist.argmax(dim=-1).double()
            self._cache[key] = self._heads((lo + (k + 0.5) * width).float())
        return self._cache[key]

    def median(self) -> torch.Tensor:
        """Median of every neuron from the histogram (error at most one bin width)."""
        if ("median",) not in self._cache:
            t = self.tensors
            hist = t["hist"].double()
            total = hist.sum(-1) + t["under"].double() + t["over"].double()
            cdf = t["under"].double()[..., None] + hist.cumsum(-1)  # [layer, N, bins]
            half = (total / 2)[..., None]
            k = (cdf < half).sum(-1).clamp(max=self.config.bins - 1)  # first bin reaching half
            before = torch.where(
                k > 0, cdf.gather(-1, (k - 1).clamp_min(0)[..., None])[..., 0], t["under"].double()
            )
            inbin = hist.gather(-1, k[..., None])[..., 0].clamp_min(1e-12)
            frac = ((total / 2 - before) / inbin).clamp(0, 1)
            width = (t["hi"].double() - t["lo"].double()) / self.config.bins
            self._cache[("median",)] = self._heads((t["lo"] + (k + frac) * width).float())
        return self._cache[("median",)]

    # -- StatsSource -----------------------------------------------------------------------
    def constant(self, kind: str, layer: int, **options: float | str) -> torch.Tensor:
        if kind == "mean":
            return self.mean[layer]
        if kind == "median":
            return self.median()[layer]
        if kind == "peak":
            return self.peak(
                str(options.get("estimator", "hist")), float(options.get("bandwidth", 0.1))
            )[layer]
        raise ConfigError(f"unknown statistic {kind!r}; use mean, median or peak")

    def reservoir(self, layer: int) -> torch.Tensor:
        res = self.tensors.get("reservoir")
        if res is None or res.shape[1] == 0:
            raise ConfigError(
                "these statistics hold no reservoir of inputs, which resample ablation needs; "
                "collect them with StatsConfig(reservoir=16) (or larger)"
            )
        return self._heads(res[layer])  # [n_inputs, pos, head, d_head]

    # -- compatibility -----------------------------------------------------------------------
    def check_layout(self, layout: Layout) -> None:
        theirs = layout.signature()
        if any(self.layout.get(k) != v for k, v in theirs.items()):
            raise StatsMismatchError(
                f"these statistics were collected on a model with layout {self.layout}, but this "
                f"model has {theirs}; collect statistics on this model (headlab.collect_stats)"
            )

    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model`` has the layout and weights these statistics came from."""
        self.check_layout(describe(model))
        self.check_fingerprint(model)

    def check_fingerprint(self, model: nn.Module) -> None:
        """Raise unless ``model``'s weights fingerprint is the one recorded when these statistics
        were collected; statistics that record none (older files) are accepted. The model's
        fingerprint is computed once and cached on it (``models.load.cached_fingerprint``), so
        :func:`headlab.intervene` can call this on every use."""
        from headlab.models.load import cached_fingerprint

        if self.model_fingerprint is None:
            return
        mine = cached_fingerprint(model)
        if mine != self.model_fingerprint:
            raise StatsMismatchError(
                "these statistics were collected on a different model (weights fingerprint "
                f"{self.model_fingerprint[:12]}...; this model's is {mine[:12]}...); collect "
                "statistics on this model with hl.collect_stats(model, ...) and pass those"
            )

    # -- disk --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write safetensors with a JSON header (layout, fingerprints, config)."""
        path = Path(path)
        header = {
            "format": _FORMAT,
            "layout": self.layout,
            "config": asdict(self.config),
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "n_inputs": self.n_inputs,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {k: v.contiguous() for k, v in self.tensors.items()},
            str(tmp),
            metadata={"headlab": json.dumps(header)},
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None) -> Stats:
        """Read statistics; with ``model``, check they were collected on it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no statistics file at {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "headlab" not in meta:
            raise ConfigError(f"{path} is not a headlab statistics file (no headlab header)")
        header = json.loads(meta["headlab"])
        if header.get("format") != _FORMAT:
            raise ConfigError(f"{path} has format {header.get('format')!r}, expected {_FORMAT!r}")
        cfg = header["config"]
        if cfg.get("fixed_range") is not None:
            cfg["fixed_range"] = tuple(cfg["fixed_range"])
        stats = cls(
            layout=header["layout"],
            config=StatsConfig(**cfg),
            tensors=load_file(str(path)),
            model_fingerprint=header.get("model_fingerprint"),
            data_fingerprint=header.get("data_fingerprint"),
            n_inputs=int(header.get("n_inputs", 0)),
        )
        if model is not None:
            stats.check_model(model)
        return stats


def _smooth(hist: torch.Tensor, sigma_bins: torch.Tensor) -> torch.Tensor:
    """Gaussian-smooth each row of ``hist`` ([layer, N, bins]) with its own width (binned KDE)."""
    bins = hist.shape[-1]
    radius = int(min(bins, math.ceil(4 * float(sigma_bins.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kern = torch.exp(-0.5 * (offsets / sigma_bins[..., None]) ** 2)  # [layer, N, taps]
    kern = kern / kern.sum(-1, keepdim=True)
    flat = hist.reshape(-1, 1, bins)
    padded = F.pad(flat, (radius, radius))
    windows = padded.unfold(-1, 2 * radius + 1, 1)  # [rows, 1, bins, taps]
    out = (windows * kern.reshape(-1, 1, 1, 2 * radius + 1)).sum(-1)
    return out.reshape(hist.shape)
