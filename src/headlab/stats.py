"""Streaming per-neuron activation statistics of the heads' outputs.

One pass over a dataset gives, for every layer and every neuron (coordinate of ``head * d_head``):
count, mean and variance (Chan/Welford merge in float64), min and max, a fixed-bin histogram from
which the **peak** (mode) and **median** are read, and a bounded reservoir of whole inputs for
resample ablation. Memory does not grow with the dataset: the histogram range is fixed from a
bounded warm-up sample (by default its [0.1 %, 99.9 %] quantiles), later values outside the range
go to under/overflow counters, and the reservoir keeps at most ``reservoir`` inputs (Algorithm R).

Statistics are saved as safetensors with a JSON header holding the layout, the model fingerprint
and the data fingerprint; using them on another model or layout raises
:class:`~headlab.errors.StatsMismatchError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError, StatsMismatchError
from headlab.hooks import capture
from headlab.models.layout import Layout, describe

__all__ = ["Stats", "StatsCollector", "StatsConfig", "collect_stats"]

_FORMAT = "headlab-stats/1"


@dataclass(frozen=True)
class StatsConfig:
    """How statistics are collected.

    Attributes:
        bins: histogram bins per neuron (peak and median resolution).
        range: ``"quantile"`` (``[q, 1-q]`` quantiles of the warm-up sample), ``"minmax"``
            (warm-up min/max) or ``"fixed"`` (``fixed_range`` for every neuron).
        quantile: ``q`` for the quantile range.
        fixed_range: ``(low, high)`` for ``range="fixed"``.
        warmup_tokens: tokens buffered per layer to fix the histogram range.
        reservoir: inputs kept for resample ablation (0: none), column by column as given;
            padding positions (``attention_mask == 0``) are stored as zeros.
        seed: seed of the reservoir sampling.
        skip_first: leave each input's first real token (often a BOS attention sink; column 0
            unless the batch is left-padded) out of mean/variance/histogram.
    """

    bins: int = 1000
    range: str = "quantile"
    quantile: float = 0.001
    fixed_range: tuple[float, float] | None = None
    warmup_tokens: int = 4096
    reservoir: int = 16
    seed: int = 0
    skip_first: bool = False

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ConfigError(f"StatsConfig.bins must be >= 2, got {self.bins}")
        if self.range not in ("quantile", "minmax", "fixed"):
            raise ConfigError(
                f"StatsConfig.range must be 'quantile', 'minmax' or 'fixed', got {self.range!r}"
            )
        if self.range == "fixed":
            fr = self.fixed_range
            if fr is None or len(fr) != 2 or not fr[0] < fr[1]:
                raise ConfigError("range='fixed' needs fixed_range=(low, high) with low < high")
        if not 0 <= self.quantile < 0.5:
            raise ConfigError(f"StatsConfig.quantile must be in [0, 0.5), got {self.quantile}")
        if self.warmup_tokens < 1 or self.reservoir < 0:
            raise ConfigError("warmup_tokens must be >= 1 and reservoir >= 0")


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


class StatsCollector:
    """Accumulates statistics from activations streamed by :func:`headlab.capture`."""

    def __init__(self, layout: Layout, config: StatsConfig | None = None) -> None:
        self.layout = layout
        self.config = config or StatsConfig()
        L, N, B = layout.n_layers, layout.n_units, self.config.bins
        dd = dict(dtype=torch.float64)
        self.count = torch.zeros(L, N, **dd)
        self.mean = torch.zeros(L, N, **dd)
        self.m2 = torch.zeros(L, N, **dd)
        self.min = torch.full((L, N), math.inf)
        self.max = torch.full((L, N), -math.inf)
        self.hist = torch.zeros(L, N, B, dtype=torch.int64)
        self.under = torch.zeros(L, N, dtype=torch.int64)
        self.over = torch.zeros(L, N, dtype=torch.int64)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._warm: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._warm_n = [0] * L
        self._ranges: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        self.res: torch.Tensor | None = None  # [layer, K, pos, N]
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self.n_inputs = 0
        self._slots: torch.Tensor | None = None  # per example of the current batch: slot or -1
        self._mask: torch.Tensor | None = None

    def begin_batch(self, batch_size: int, mask: torch.Tensor | None = None) -> None:
        """Announce the next forward of ``batch_size`` inputs; ``mask`` [batch, pos] marks the
        tokens that count (``None``: every token, e.g. image patches)."""
        self._mask = None if mask is None else mask.bool().cpu().clone()
        K = self.config.reservoir
        slots = torch.full((batch_size,), -1, dtype=torch.long)
        for i in range(batch_size if K else 0):
            t = self.n_inputs + i
            if t < K:
                slots[i] = t
            else:
                j = int(torch.randint(0, t + 1, (1,), generator=self._gen))
                if j < K:
                    slots[i] = j
        self._slots = slots
        self.n_inputs += batch_size

    def update(self, layer: int, z: torch.Tensor) -> None:
        """Add one layer's head outputs ``z`` [batch, pos, head, d_head] of the announced batch."""
        if self._slots is None:
            raise HeadlabError("StatsCollector.update called before begin_batch")
        flat = z.reshape(z.shape[0], z.shape[1], -1).float().cpu()  # [batch, pos, N]
        self._reserve(layer, flat)
        mask = torch.ones(flat.shape[:2], dtype=torch.bool) if self._mask is None else self._mask
        if self.config.skip_first:  # each row's first real token (column 0 unless left-padded)
            mask = mask & (mask.cumsum(1) > 1)
        x = flat[mask]  # [tokens, N]
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise HeadlabError(
                f"{bad} NaN/Inf activations in layer {layer} while collecting statistics; the "
                "model overflowed or its weights are broken — use dtype float32, check the inputs"
            )
        self._moments(layer, x.double())
        if self._ranges[layer] is None:
            self._warm[layer].append(x)
            self._warm_n[layer] += x.shape[0]
            if self._warm_n[layer] >= self.config.warmup_tokens:
                self._flush_warmup(layer)
        else:
            self._histogram(layer, x)

    def _reserve(self, layer: int, flat: torch.Tensor) -> None:
        if not self.config.reservoir:
            return
        p = flat.shape[1]
        if self.res is None:
            self.res = torch.zeros(
                self.layout.n_layers, self.config.reservoir, p, self.layout.n_units
            )  # [layer, K, pos, N]
        elif self.res.shape[2] != p:
            raise ConfigError(
                f"the resample reservoir needs inputs of equal length ({self.res.shape[2]} "
                f"tokens), got {p}; use fixed-length blocks or StatsConfig(reservoir=0)"
            )
        keep = self._slots >= 0
        if keep.any():
            if self._mask is not None:  # padding activations never enter the statistics
                flat = flat.masked_fill(~self._mask[..., None], 0.0)
            self.res[layer, self._slots[keep]] = flat[keep]

    def _moments(self, layer: int, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count[layer]
        n = n_a + n_b
        delta = mean_b - self.mean[layer]
        self.mean[layer] += delta * (n_b / n)
        self.m2[layer] += m2_b + delta**2 * (n_a * n_b / n)
        self.count[layer] = n
        self.min[layer] = torch.minimum(self.min[layer], x.min(0).values.float())
        self.max[layer] = torch.maximum(self.max[layer], x.max(0).values.float())

    def _flush_warmup(self, layer: int) -> None:
        buf = torch.cat(self._warm[layer])  # [tokens, N]
        cfg = self.config
        if cfg.range == "fixed":
            lo = torch.full((buf.shape[1],), float(cfg.fixed_range[0]))
            hi = torch.full((buf.shape[1],), float(cfg.fixed_range[1]))
        else:
            srt = buf.sort(dim=0).values
            q = cfg.quantile if cfg.range == "quantile" else 0.0
            n = srt.shape[0]
            lo = srt[math.floor(q * (n - 1))]
            hi = srt[math.ceil((1 - q) * (n - 1))]
        span = hi - lo
        tiny = 1e-6 * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
        hi = torch.where(span > tiny, hi, lo + tiny)  # constant neurons get a tiny range
        self._ranges[layer] = (lo, hi)
        self._warm[layer] = []
        self._histogram(layer, buf)

    def _histogram(self, layer: int, x: torch.Tensor) -> None:
        lo, hi = self._ranges[layer]
        B = self.config.bins
        pos = (x - lo) / (hi - lo) * B  # [tokens, N] in bin units
        self.under[layer] += (pos < 0).sum(0)
        self.over[layer] += (pos > B).sum(0)
        inside = (pos >= 0) & (pos <= B)  # the top edge belongs to the last bin
        k = pos.clamp(0, B - 1).long()
        N = x.shape[1]
        flat = (torch.arange(N) * B)[None, :] + k  # [tokens, N] flat bin index
        counts = torch.bincount(flat[inside], minlength=N * B)
        self.hist[layer] += counts.view(N, B)

    def finalize(
        self, *, model_fingerprint: str | None = None, data_fingerprint: str | None = None
    ) -> Stats:
        L, N = self.layout.n_layers, self.layout.n_units
        for layer in range(L):
            if self._ranges[layer] is None:
                if not self._warm[layer]:
                    raise HeadlabError(
                        f"no activations reached layer {layer}: the statistics data selected no "
                        "tokens (empty batch or all-padding attention mask)"
                    )
                self._flush_warmup(layer)
        lo = torch.stack([r[0] for r in self._ranges])
        hi = torch.stack([r[1] for r in self._ranges])
        tensors = {
            "count": self.count.float(),
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min,
            "max": self.max,
            "hist": self.hist.to(torch.int32),
            "lo": lo,
            "hi": hi,
            "under": self.under,
            "over": self.over,
        }
        if self.res is not None:
            k = min(self.n_inputs, self.config.reservoir)
            tensors["reservoir"] = self.res[:, :k].contiguous()
        else:
            tensors["reservoir"] = torch.zeros(L, 0, 0, N)
        return Stats(
            layout=self.layout.signature(),
            config=self.config,
            tensors=tensors,
            model_fingerprint=model_fingerprint,
            data_fingerprint=data_fingerprint,
            n_inputs=self.n_inputs,
        )


def collect_stats(
    model: nn.Module,
    data: Batch | Iterable[Batch],
    *,
    config: StatsConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Stats:
    """Collect statistics of every layer's head outputs in one streaming pass over ``data``; they
    record ``model``'s weights fingerprint, and interventions refuse them on another model."""
    from headlab.models.load import cached_fingerprint

    layout = describe(model)
    collector = StatsCollector(layout, config)
    batches = data.chunks(batch_size) if isinstance(data, Batch) else list(data)
    if not batches:
        raise ConfigError("collect_stats got no data; pass a non-empty Batch")
    digest = _data_digest(batches)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="statistics", unit="batch")
    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, collector.update, layout=layout):
        for b in it:
            inputs = b.to(device).model_inputs(model)  # with the positions of a left-padded batch
            collector.begin_batch(len(b), b.attention_mask)
            model(**inputs)
    return collector.finalize(model_fingerprint=cached_fingerprint(model), data_fingerprint=digest)


def _data_digest(batches: list[Batch]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.pixel_values):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
