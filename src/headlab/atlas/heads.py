"""What the atlas shows of each head that needs the model itself: its attention pattern on one
example of the runs' own tokens, and the tokens its mean output promotes and suppresses.

The mean head output ``mu[layer, head, d_head]`` is the run's statistics mean where a run holds
``stats.safetensors`` (collected on its statistics split), else the mean over the real tokens of
the run's evaluation batch. A head's direct effect on the logits is
``W_U (g * (W_O[:, cols(head)] mu))``: through its own columns of the output projection, the
final norm's gain ``g`` and the unembedding, centred over the vocabulary (softmax ignores a shift
shared by every logit). Tokens with the largest values are promoted, the smallest suppressed.

The model is loaded from the runs' manifest (name or folder, dtype) on the CPU, never from the
network; a model that cannot be loaded, or whose weights are not the ones the runs measured,
leaves these sections out with a note saying why.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from headlab.atlas.rundirs import RunView
from headlab.batch import Batch
from headlab.errors import HeadlabError
from headlab.models.layout import Layout, describe

__all__ = ["HeadViews", "head_views"]

#: tokens of the example whose attention patterns the cards show (keeps 1,024 heads small)
MAX_TOKENS = 48
#: promoted and suppressed tokens per head
TOP_TOKENS = 8
#: evaluation examples averaged for the mean head output when no run holds statistics
MEAN_EXAMPLES = 16


@dataclass
class HeadViews:
    """Per-head views from the model.

    Attributes:
        tokens: labels of the example's tokens (``None``: no patterns).
        patterns: ``[layer, head, q, k]`` attention weights quantised to ``round(255 a)`` (uint8).
        pattern_source: which file and example the patterns come from.
        promoted / suppressed: ``[layer][head]`` lists of ``(token label, logit)``.
        mean_source: where the mean head output comes from.
    """

    tokens: list[str] | None = None
    patterns: np.ndarray | None = None
    pattern_source: str = ""
    promoted: list[list[list[tuple[str, float]]]] | None = None
    suppressed: list[list[list[tuple[str, float]]]] | None = None
    mean_source: str = ""

    def payload(self) -> dict[str, Any]:
        """The JSON-able form the page embeds (patterns as base64 of the uint8 array)."""
        out: dict[str, Any] = {"pattern_source": self.pattern_source,
                               "mean_source": self.mean_source}  # fmt: skip
        if self.patterns is not None:
            out["tokens"] = self.tokens
            out["pattern_shape"] = list(self.patterns.shape)
            out["patterns"] = base64.b64encode(self.patterns.tobytes()).decode("ascii")
        if self.promoted is not None:
            out["promoted"], out["suppressed"] = self.promoted, self.suppressed
        return out


@contextmanager
def _offline() -> Iterator[None]:
    """No network while loading: a hub id loads only from the local cache."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _load(runs: list[RunView], notes: list[str]) -> tuple[nn.Module, Any] | None:
    from headlab.models.fingerprint import cached_fingerprint
    from headlab.parts import ModelSpec

    ident = next((r.identity for r in runs if r.identity.get("model")), None)
    if ident is None:
        notes.append("the runs name no model, so attention patterns and token effects are left out")
        return None
    spec = ModelSpec(
        str(ident["model"]), dtype=str(ident.get("dtype") or "float32"),
        trust_remote_code=bool(ident.get("trust_remote_code", False)),
    )  # fmt: skip
    try:
        with _offline():
            model, tokenizer = spec.load()
    except (HeadlabError, OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        notes.append(
            f"the model {spec.model!r} could not be loaded here ({first}); attention patterns "
            "and promoted tokens are left out"
        )
        return None
    want = runs[0].fingerprint
    if want is not None and cached_fingerprint(model) != want:
        notes.append(
            f"the model now at {spec.model!r} is not the one the runs measured (fingerprint "
            f"{cached_fingerprint(model)[:16]}, runs {want[:16]}); attention patterns and "
            "promoted tokens are left out"
        )
        return None
    return model, tokenizer


def _tokens(runs: list[RunView]) -> tuple[Batch, str] | None:
    """The text batch (``input_ids``, ``attention_mask``) of the first run that saved tokens, and
    which file it is."""
    from safetensors.torch import load_file

    for run in runs:
        for name in ("tokens.safetensors", "prompt_tokens.safetensors"):
            path = run.file(name)
            if path is None:
                continue
            try:
                tensors = load_file(str(path))
            except Exception as err:  # damaged: try the next run
                run.notes.append(f"{name} could not be read ({err})")
                continue
            if "input_ids" in tensors:
                batch = Batch(input_ids=tensors["input_ids"],
                              attention_mask=tensors.get("attention_mask"))  # fmt: skip
                return batch, f"{run.label}/{name}"
    return None


def _example(batch: Batch) -> torch.Tensor:
    """Example 0's real tokens (padding dropped), at most ``MAX_TOKENS``: ``[pos]``."""
    row = batch.input_ids[0]
    if batch.attention_mask is not None:
        row = row[batch.attention_mask[0].bool()]
    return row[:MAX_TOKENS]


def _patterns(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    """``[layer, head, q, k]`` attention of one sequence, quantised to uint8."""
    from headlab.models.attention import attention_patterns

    [(_, attn)] = list(attention_patterns(model, Batch(input_ids=ids[None]), batch_size=1))
    a = attn[:, 0].clamp(0, 1)  # [layer, batch=1, head, q, k] -> [layer, head, q, k]
    return torch.round(a * 255).to(torch.uint8).numpy()


def _mean_output(
    runs: list[RunView], model: nn.Module, layout: Layout, found: tuple[Batch, str] | None
) -> tuple[torch.Tensor, str] | None:
    """``mu[layer, head, d_head]`` and where it comes from."""
    from headlab.stats import Stats

    for run in runs:
        path = run.file("stats.safetensors")
        if path is None:
            continue
        try:
            stats = Stats.load(path)
        except HeadlabError as err:
            run.notes.append(f"stats.safetensors could not be read ({err})")
            continue
        if stats.model_fingerprint in (None, run.fingerprint):
            return stats.mean, f"mean over {stats.n_inputs} inputs of {run.label}/stats.safetensors"
    if found is None:
        return None
    from headlab.hooks import capture
    from headlab.models.layout import input_device

    batch = found[0].slice(0, min(MEAN_EXAMPLES, len(found[0])))
    ids = batch.input_ids
    real = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(ids)
    weight = real.double()[:, :, None, None]  # [batch, pos, 1, 1]
    total = torch.zeros(layout.shape, dtype=torch.float64)  # [layer, head, d_head]

    def add(layer: int, z: torch.Tensor) -> None:  # z: [batch, pos, head, d_head]
        total[layer] += (z.double().cpu() * weight).sum((0, 1))

    with torch.no_grad(), capture(model, add, layout=layout):
        model(**batch.to(input_device(model)).model_inputs())
    n = int(real.sum())
    return (total / n).float(), f"mean over {n} tokens of {found[1]}"


def _logit_effects(
    model: nn.Module, tokenizer: Any, layout: Layout, mean: torch.Tensor
) -> tuple[list, list]:
    """``[layer][head]`` lists of the ``TOP_TOKENS`` promoted and suppressed ``(label, logit)``."""
    from headlab.analyses.attention.maps import token_labels
    from headlab.analyses.steer.select import final_norm
    from headlab.models.dispatch import loaded_weights

    with loaded_weights(model.get_output_embeddings()) as head:
        unembed = head.weight.detach().float()  # [vocab, d_model]
    gain = torch.ones(unembed.shape[1])
    norm = final_norm(model, layout)
    if norm is not None:
        with loaded_weights(norm):
            gain = norm.weight.detach().float().cpu()
        if type(norm).__name__.startswith("Gemma"):
            gain = 1.0 + gain  # Gemma's RMSNorm multiplies by (1 + weight)
    promoted, suppressed = [], []
    with torch.no_grad():
        for ly in range(layout.n_layers):
            with loaded_weights(layout.out_projs[ly]):
                out = torch.stack(
                    [
                        layout.out_weight_columns(ly, h).detach().float().cpu() @ mean[ly, h]
                        for h in range(layout.n_heads)
                    ]
                )  # [head, d_model]
            logits = (out * gain) @ unembed.T.cpu()  # [head, vocab]
            logits = logits - logits.mean(1, keepdim=True)
            k = min(TOP_TOKENS, logits.shape[1])
            for side, largest in ((promoted, True), (suppressed, False)):
                vals, idx = logits.topk(k, dim=1, largest=largest)  # [head, k]
                side.append([
                    list(zip(token_labels(tokenizer, row.tolist()),
                             [round(float(v), 4) for v in vrow], strict=True))
                    for row, vrow in zip(idx, vals, strict=True)
                ])  # fmt: skip
    return promoted, suppressed


def head_views(
    runs: list[RunView], *, on_status: Callable[[str], None] | None = None
) -> tuple[HeadViews | None, list[str]]:
    """The model's views of every head for the atlas of ``runs`` (``None`` when the model cannot
    be loaded), and notes on what was left out."""
    notes: list[str] = []
    if on_status:
        on_status("loading the model for attention patterns and promoted tokens")
    loaded = _load(runs, notes)
    if loaded is None:
        return None, notes
    model, tokenizer = loaded
    layout = describe(model)
    views = HeadViews()
    found = _tokens(runs)
    if found is None:
        notes.append("no run saved text tokens, so the cards show no attention pattern")
    else:
        example = _example(found[0])
        try:
            views.patterns = _patterns(model, example)
        except HeadlabError as err:
            notes.append(f"attention patterns could not be read ({err})")
        else:
            from headlab.analyses.attention.maps import token_labels

            views.tokens = token_labels(tokenizer, example.tolist())
            views.pattern_source = f"example 0 of {found[1]} (first {len(example)} tokens)"
    if tokenizer is None or model.get_output_embeddings() is None:
        notes.append("the model has no unembedding, so the cards show no promoted tokens")
        return views, notes
    mean = _mean_output(runs, model, layout, found)
    if mean is None:
        notes.append("no statistics and no tokens: the cards show no promoted tokens")
        return views, notes
    views.promoted, views.suppressed = _logit_effects(model, tokenizer, layout, mean[0])
    views.mean_source = mean[1]
    return views, notes
