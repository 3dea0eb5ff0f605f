"""The :class:`Stats` container: per-neuron summaries, peak and median read from the histogram,
the intervention interface (``constant``, ``reservoir``), compatibility checks and safetensors
save/load."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from headlab.defaults import DEFAULT_KDE_BANDWIDTH
from headlab.errors import ConfigError, StatsMismatchError
from headlab.models.layout import Layout, describe
from headlab.stats.config import StatsConfig

_FORMAT = "headlab-stats/1"


@dataclass(eq=False)
class Stats:
    """Collected statistics; implements what interventions need (``constant``, ``reservoir``).

    Tensors are stacked over layers; ``N = n_heads * d_head`` neurons per layer. The first
    :meth:`peak` or :meth:`median` of each kind checks the statistics are thick enough for it
    (:func:`~headlab.stats.thin.thin_message`) and, when not, tells ``say`` (a job sets its
    ``on_status``) or raises a :class:`~headlab.stats.thin.ThinStatisticsWarning`.
    """

    layout: dict[str, object]
    config: StatsConfig
    tensors: dict[str, torch.Tensor]
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    n_inputs: int = 0
    say: Callable[[str], None] | None = field(default=None, repr=False)
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _told: set[tuple] = field(default_factory=set, repr=False)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["say"] = None  # a job's printer stays in its process (Ray workers warn instead)
        return state

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

    def peak(
        self, estimator: str | None = None, bandwidth: float = DEFAULT_KDE_BANDWIDTH
    ) -> torch.Tensor:
        """Mode of every neuron, ``[layer, head, d_head]``: ``"hist"``, the centre of the fullest
        bin; ``"kde"``, the highest point of a Gaussian kernel density (kernel sd ``bandwidth``
        times the neuron's sd) computed on the histogram; ``None``, ``config.peak_estimator``."""
        estimator = self.config.peak_estimator if estimator is None else estimator
        if estimator == "hist":
            bandwidth = DEFAULT_KDE_BANDWIDTH  # unused: one cache entry
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
            self._check_thick(key, "peak", estimator, bandwidth)
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
            self._check_thick(("median",), "median")
        return self._cache[("median",)]

    def _check_thick(self, key: tuple, kind: str, *args: object) -> None:
        """Report, once per statistics object and estimator, statistics too thin for ``kind``."""
        from headlab.stats.thin import ThinStatisticsWarning, thin_message

        if key in self._told:
            return
        self._told.add(key)
        message = thin_message(self, kind, *args)
        if message is None:
            return
        if self.say is not None:
            self.say(message)
        else:
            warnings.warn(message, ThinStatisticsWarning, stacklevel=4)

    # -- StatsSource -----------------------------------------------------------------------
    def constant(self, kind: str, layer: int, **options: float | str) -> torch.Tensor:
        if kind == "mean":
            return self.mean[layer]
        if kind == "median":
            return self.median()[layer]
        if kind == "peak":
            estimator = options.get("estimator")
            return self.peak(
                None if estimator is None else str(estimator),
                float(options.get("bandwidth", DEFAULT_KDE_BANDWIDTH)),
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
        cfg.setdefault("peak_estimator", "hist")  # saved before `peak` meant the KDE peak
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
    """Gaussian-smooth each row of ``hist`` ([layer, N, bins]) with its own width ``sigma_bins``
    ([layer, N], in bins): a binned KDE. The kernel is sampled on the bins, cut at
    ``4 * max(sigma)`` (at most ``bins``) and normalised; the convolution is a product in
    frequency space, one layer at a time, so memory stays ~``N * bins`` whatever the width (a
    direct sliding window needs ``N * bins * 8 * sigma``: tens of GB for a real model)."""
    bins = hist.shape[-1]
    radius = int(min(bins, math.ceil(4 * float(sigma_bins.max()))))
    n = bins + 2 * radius  # zero padding >= radius on each side: no wrap-around
    j = torch.arange(n, dtype=torch.float64)
    dist = torch.minimum(j, n - j)  # [n] circular offset of each tap
    out = torch.empty_like(hist)
    for layer in range(hist.shape[0]):
        kern = torch.exp(-0.5 * (dist / sigma_bins[layer, :, None]) ** 2)  # [N, n]
        kern = kern.masked_fill(dist > radius, 0.0)
        kern = kern / kern.sum(-1, keepdim=True)
        spec = torch.fft.rfft(F.pad(hist[layer], (radius, radius)), n=n)  # [N, n // 2 + 1]
        smooth = torch.fft.irfft(spec * torch.fft.rfft(kern, n=n), n=n)  # [N, n]
        out[layer] = smooth[:, radius : radius + bins]
    return out
