"""The clean run of a sub-batch (:func:`_clean_run`: block outputs for prefix reuse, the final
hidden state, the clean scores) and :class:`CleanCache`, which shares clean runs between several
:func:`~headlab.engine.run_plans` calls."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from headlab.batch import Batch
from headlab.engine.score import _Clean, _full_logits, _logits_of, _plain_head, _score
from headlab.errors import HeadlabError
from headlab.hooks import BlockOutput, capture_blocks, tap_output_head
from headlab.metrics import Metric
from headlab.models.layout import call_model, input_device


class CleanCache:
    """Clean runs shared by several :func:`run_plans` calls on one model and one batch.

    A sweep calls :func:`run_plans` once per layer; passing the same cache to every call runs the
    clean pass of each sub-batch once instead of once per call. It holds every block's output
    (``layers x examples x pos x d_model`` floats) and is valid only while the model's weights
    stay unchanged; a call with another model, batch, chunking or metrics replaces its content.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._runs: dict[int, _Clean] = {}

    def _get(self, key: tuple, index: int, chunk: Batch) -> _Clean | None:
        if key != self._key:
            self._key, self._runs = key, {}
            return None
        run = self._runs.get(index)
        if run is None or not _same_inputs(run.chunk, chunk):
            return None
        return run

    def _put(self, index: int, run: _Clean) -> None:
        self._runs[index] = run

    def clear(self) -> None:
        """Forget every stored clean run."""
        self._key, self._runs = None, {}


def _same_inputs(a: Batch, b: Batch) -> bool:
    pairs = (
        (a.input_ids, b.input_ids),
        (a.pixel_values, b.pixel_values),
        (a.attention_mask, b.attention_mask),
    )
    for x, y in pairs:
        if (x is None) != (y is None):
            return False
        if x is not None and (x.shape != y.shape or not torch.equal(x.cpu(), y.cpu())):
            return False
    return True


def _clean_run(
    model: nn.Module,
    chunk: Batch,
    ms: list[Metric],
    blocks: nn.ModuleList | None,
    window_tokens: int,
) -> _Clean:
    recorded: dict[int, BlockOutput] = {}
    with ExitStack() as stack:
        if blocks is not None:
            stack.enter_context(capture_blocks(blocks, recorded.__setitem__))
        try:
            tap = stack.enter_context(tap_output_head(model))
        except HeadlabError:
            tap = None
        logits = _logits_of(call_model(model, chunk.model_inputs()), model)
    hidden = tap.hidden.detach() if tap is not None and tap.calls == 1 else None
    plain = hidden is not None and _plain_head(model, hidden, logits)
    full = _full_logits(ms, plain)
    clean = _Clean(
        chunk=chunk,
        blocks=[recorded[i] for i in range(len(blocks))]
        if blocks is not None and len(recorded) == len(blocks)
        else None,
        hidden=hidden if plain else None,
        plain_head=plain,
        logits=logits if full and any(m.needs_clean for m in ms) else None,
        scores={},
    )
    # the clean run is scored by the same code, on the same shapes, as every intervened run
    clean.scores = _score(model, ms, clean, logits if full else None, hidden, window_tokens)
    return clean


def _measured_clean_run(
    model: nn.Module,
    chunk: Batch,
    ms: list[Metric],
    blocks: nn.ModuleList | None,
    window_tokens: int,
) -> _Clean:
    """:func:`_clean_run`, recording its peak GPU memory per token on CUDA."""
    device = input_device(model)
    if device.type != "cuda":
        return _clean_run(model, chunk, ms, blocks, window_tokens)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    clean = _clean_run(model, chunk, ms, blocks, window_tokens)
    peak = torch.cuda.max_memory_allocated(device) - base
    clean.bytes_per_token = peak / max(
        1, chunk.input_ids.numel() if chunk.input_ids is not None else len(chunk)
    )
    return clean
