"""Collection: :class:`StatsCollector` accumulates moments, histograms and the reservoir from
streamed head outputs; :func:`collect_stats` runs one streaming pass of a model over a batch."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError, HeadlabError
from headlab.hooks import capture
from headlab.models.layout import Layout, describe, input_device
from headlab.stats.config import StatsConfig
from headlab.stats.container import Stats


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
        # the range comes from exactly the first warmup_tokens tokens, wherever the batches end,
        # so the statistics do not depend on the batch size
        head = buf[: cfg.warmup_tokens]
        if cfg.range == "fixed":
            lo = torch.full((buf.shape[1],), float(cfg.fixed_range[0]))
            hi = torch.full((buf.shape[1],), float(cfg.fixed_range[1]))
        else:
            srt = head.sort(dim=0).values
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
    device = input_device(model)
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
