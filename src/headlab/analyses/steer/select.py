"""Which heads carry a concept: Head-Pursuit scores (SOMP) and a concept-mass ablation sweep.

**Pursuit** (Basile et al. 2025, METHODS.md §5). ``X_h`` (``[n, d_model]``) is head ``h``'s residual
contribution ``W_O[:, cols_h] @ z_h`` at the chosen positions of the selection prompts. The
dictionary ``D`` (``[m, d_model]``) holds one atom per concept token: its unembedding row times
the final norm's gain (``g * W_U[j]``; Gemma-style norms use ``1 + g``; LayerNorm rows are also
centred, since LayerNorm subtracts the mean), scaled to unit norm — the direction in the
residual stream that the token's logit reads. Simultaneous Orthogonal Matching Pursuit runs
``steps`` times: pick the atom maximising ``sum_i |<R_i, d_j>|``, refit ``X_h`` by least squares on
the chosen atoms, and set ``R`` to the residual. ``score_h = 1 - ||R||_F^2 / ||X_h||_F^2`` is the
share of the head's output that the concept explains (0: orthogonal, 1: inside the span).

**Random-dictionary control (ours).** On SmolLM2-135M the raw score ranks layer-0 heads first
for every concept, and they score almost as high (0.2-0.3) on dictionaries of *random* tokens:
their outputs live in a few directions that any set of token rows partly spans. So by default a
head is ranked by ``score - control``, the control being its mean score on ``controls`` random
dictionaries of the same size (:func:`control_token_sets`): how much better the concept explains
the head than arbitrary tokens do. ``controls=()`` gives the paper's raw ranking.

Dictionary centring (ours): the mean unembedding row is removed before the gain is folded (softmax
ignores a shift shared by every logit, so this direction moves no probability).

Defaults (ours): ``steps = 5`` atoms and the *last* position of each selection prompt (where the
concept would be predicted); ``positions="all"`` uses every real token but the first (the first
position's outputs are attention-sink artefacts with outsized norms).

**Sweep**: zero-ablate each head alone (through the engine) on the selection prompts and measure
the log-probability mass of the concept tokens at the next token
(``log sum_{j in concept} p_j`` at the last prompt token); the heads whose ablation lowers it most
are selected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from headlab.analyses.sweep import sweep
from headlab.batch import Batch
from headlab.data.blocks import bos_prefix
from headlab.errors import ConfigError, HeadlabError
from headlab.heads import Head
from headlab.hooks import blocks_of, record
from headlab.metrics import Metric, Scores
from headlab.models.dispatch import loaded_weights
from headlab.models.layout import Layout, describe, input_device
from headlab.parts import Context, Part

__all__ = [
    "ConceptMass",
    "SelectSweepPart",
    "concept_batch",
    "concept_dictionary",
    "control_token_sets",
    "final_norm",
    "head_contributions",
    "pursuit_scores",
    "select_heads",
    "somp",
    "sweep_scores",
]

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


def final_norm(model: nn.Module, layout: Layout | None = None) -> nn.Module | None:
    """The normalisation applied to the last hidden state before the unembedding (or ``None``)."""
    layout = layout if layout is not None else describe(model)
    d_model = model.get_output_embeddings().weight.shape[1]
    try:
        inside = {id(m) for block in blocks_of(model, layout) for m in block.modules()}
    except HeadlabError:  # no list of blocks: rely on the module names alone
        inside = set()
    found = None
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if (
            name.rsplit(".", 1)[-1] in _NORM_NAMES
            and id(mod) not in inside
            and isinstance(weight, torch.Tensor)
            and weight.shape == (d_model,)
        ):
            found = mod
    return found


def concept_dictionary(
    model: nn.Module, token_ids: Sequence[int], *, layout: Layout | None = None
) -> torch.Tensor:
    """Unit-norm atoms ``[m, d_model]``: each token's unembedding row with the final norm's gain
    folded in (and centred for LayerNorm), in float64."""
    if not token_ids:
        raise ConfigError("the concept has no tokens; give at least one word")
    with loaded_weights(model.get_output_embeddings()) as head:  # also where offloaded
        unembed = head.weight.detach().double()  # [vocab, d_model]
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    if int(ids.max()) >= unembed.shape[0] or int(ids.min()) < 0:
        raise ConfigError(f"token ids {list(token_ids)} are outside the vocabulary")
    # softmax ignores a shift shared by every logit, so the mean row over the vocabulary moves no
    # probability: remove it (TransformerLens' centred unembedding) before folding the gain
    atoms = unembed[ids] - unembed.mean(0)  # [m, d_model]
    norm = final_norm(model, layout)
    if norm is not None:
        with loaded_weights(norm):
            gain = norm.weight.detach().double()
        if type(norm).__name__.startswith("Gemma"):
            gain = 1.0 + gain  # Gemma's RMSNorm multiplies by (1 + weight)
        atoms = atoms * gain
        if isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__:
            atoms = atoms - atoms.mean(1, keepdim=True)  # LayerNorm centres its input
    lengths = atoms.norm(dim=1, keepdim=True)
    if bool((lengths == 0).any()):
        raise ConfigError("a concept token has a zero unembedding row; it cannot be an atom")
    return atoms / lengths


def somp(x: torch.Tensor, atoms: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Simultaneous Orthogonal Matching Pursuit of ``x`` ``[n, d]`` on unit ``atoms`` ``[m, d]``.

    Returns ``(score, chosen atom indices)`` with ``score = 1 - ||R||^2 / ||x||^2`` (0 for an
    all-zero ``x``).
    """
    if steps < 1:
        raise ConfigError(f"pursuit steps must be at least 1, got {steps}")
    x, d = x.double(), atoms.double()
    total = float((x * x).sum())
    if total == 0.0:
        return 0.0, []
    residual, chosen = x, []
    for _ in range(min(steps, d.shape[0])):
        corr = (residual @ d.T).abs().sum(0)  # [m]
        if chosen:
            corr[chosen] = -1.0
        if float((residual * residual).sum()) <= 1e-10 * total:
            break  # x lies in the span of the chosen atoms
        chosen.append(int(corr.argmax()))
        basis = d[chosen]  # [s, d]
        coef = x @ torch.linalg.pinv(basis)  # [n, s]: least squares x ~ coef @ basis
        residual = x - coef @ basis
    return 1.0 - float((residual * residual).sum()) / total, chosen


def concept_batch(tokenizer: Any, prompts: Sequence[str], *, prepend_bos: bool | None = None):
    """Right-padded prompts with ``answer_pos`` at each prompt's last token."""
    prefix = bos_prefix(tokenizer, prepend_bos)
    rows = [prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ConfigError("a selection prompt is empty; remove it")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [batch, pos]
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = mask.sum(1) - 1
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        target_mask=torch.zeros_like(ids, dtype=torch.bool),
        answer_pos=last,
    )


def head_contributions(
    model: nn.Module, batch: Batch, *, positions: str = "last", layout: Layout | None = None
) -> dict[Head, torch.Tensor]:
    """``{(layer, head): X_h}`` with ``X_h = z_h @ W_O[:, cols_h].T`` (``[n, d_model]``) at the
    last prompt token (``positions="last"``) or at every real token but the first (``"all"``)."""
    layout = layout if layout is not None else describe(model)
    if positions not in ("last", "all"):
        raise ConfigError(f"positions must be 'last' or 'all', got {positions!r}")
    device = input_device(model)
    acts = record(model, batch.to(device).model_inputs())
    mask = batch.attention_mask.bool() if batch.attention_mask is not None else None
    if positions == "last":
        keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        keep[torch.arange(len(batch)), batch.answer_pos] = True
    else:
        keep = mask.clone() if mask is not None else torch.ones_like(batch.input_ids, dtype=bool)
        keep[:, 0] = False
    out = {}
    with torch.no_grad():
        for ly in range(layout.n_layers):
            z = acts[ly][keep.to(acts[ly].device)].double()  # [n, head, d_head]
            with loaded_weights(layout.out_projs[ly]):  # also where offloaded
                w_o = [layout.out_weight_columns(ly, h).double() for h in range(layout.n_heads)]
            for h, w in enumerate(w_o):  # w: [d_model, d_head], a copy
                out[(ly, h)] = (z[:, h] @ w.T).cpu()  # [n, d_model]
    return out


def pursuit_scores(
    model: nn.Module,
    batch: Batch,
    token_ids: Sequence[int],
    *,
    steps: int = 5,
    positions: str = "last",
    controls: Sequence[Sequence[int]] = (),
    labels: Sequence[str] | None = None,
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Head-Pursuit score of every head, ranked.

    Columns ``layer, head, method, metric, value, score, control, atoms, out_norm, rank``:
    ``score`` is the pursuit score on the concept's dictionary; ``control`` its mean on the
    ``controls`` dictionaries (random token sets of the same size; NaN without controls);
    ``value = score - control`` (metric ``pursuit_vs_random``), or ``score`` without controls
    (metric ``pursuit_score``). ``atoms``: the chosen tokens in pursuit order; ``out_norm``: mean
    ``||o_h||``.
    """
    layout = layout if layout is not None else describe(model)
    dictionary = concept_dictionary(model, token_ids, layout=layout)
    others = [concept_dictionary(model, ids, layout=layout) for ids in controls]
    names = list(labels) if labels is not None else [str(t) for t in token_ids]
    rows = []
    for (ly, h), x in head_contributions(model, batch, positions=positions, layout=layout).items():
        score, chosen = somp(x, dictionary, steps)
        control = sum(somp(x, d, steps)[0] for d in others) / len(others) if others else math.nan
        rows.append(
            {
                "layer": ly,
                "head": h,
                "method": "pursuit",
                "metric": "pursuit_vs_random" if others else "pursuit_score",
                "value": score - control if others else score,
                "score": score,
                "control": control,
                "atoms": "|".join(names[j] for j in chosen),
                "out_norm": float(x.norm(dim=1).mean()),
            }
        )
    return _ranked(pd.DataFrame(rows), "value")


def control_token_sets(
    tokenizer: Any, size: int, n: int, *, seed: int = 0, exclude: Sequence[int] = ()
) -> list[tuple[int, ...]]:
    """``n`` random sets of ``size`` distinct ordinary tokens among the 10,000 lowest ids (BPE ids
    roughly follow frequency, like the common words of a concept), none in ``exclude``: the
    control dictionaries of :func:`pursuit_scores`. Set ``i`` is drawn with seed ``seed + i``."""
    from headlab.data.tasks import ordinary_token_ids

    drop = set(exclude)
    pool = [int(t) for t in ordinary_token_ids(tokenizer, limit=10_000) if int(t) not in drop]
    if size > len(pool):
        raise ConfigError(f"control dictionaries of {size} tokens need more than {len(pool)}")
    out = []
    for i in range(n):
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + i))
        out.append(tuple(pool[j] for j in perm[:size].tolist()))
    return out


@dataclass(frozen=True, eq=False)
class ConceptMass(Metric):
    """``log sum_{j in token_ids} softmax(logits)_j`` at ``answer_pos``."""

    token_ids: tuple[int, ...] = field(default=())
    name: str = "concept_logmass"
    reads: str = "answer"
    higher_is_better: bool = True

    def __call__(self, logits: torch.Tensor, batch: Batch, clean=None) -> Scores:
        if logits.ndim == 3:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, batch.answer_pos.to(logits.device)]  # [batch, vocab]
        lg = logits.float()
        ids = torch.tensor(self.token_ids, device=lg.device)
        mass = lg[:, ids].logsumexp(-1) - lg.logsumexp(-1)  # [batch]
        return Scores(self.name, mass.detach().cpu(), None, torch.ones(mass.shape[0]))


def sweep_scores(
    model: nn.Module,
    batch: Batch,
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    layout: Layout | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Zero-ablate each head alone; ``value`` = concept log-mass with the head ablated, ``effect``
    = how much the ablation lowers it (positive: the head promotes the concept); ranked."""
    metric = ConceptMass(tuple(int(t) for t in token_ids))
    table = sweep(
        model, batch, methods=["zero"], metrics=[metric], batch_size=batch_size, layout=layout,
        on_forward=on_forward,
    )  # fmt: skip
    return _ranked(table, "effect")


@dataclass(frozen=True)
class SelectSweepPart(Part):
    """:func:`sweep_scores` of the concept's ``token_ids`` on ``ctx.batch`` (the selection
    prompts) as one part, key ``select-sweep``."""

    token_ids: tuple[int, ...]
    key: str = "select-sweep"

    def cost(self, ctx: Context) -> int:
        return ctx.layout.n_layers * ctx.layout.n_heads * len(ctx.batch)

    def run(self, ctx: Context, on_forward: Callable[[int], None] | None = None) -> pd.DataFrame:
        return sweep_scores(
            ctx.model, ctx.batch, self.token_ids, batch_size=ctx.batch_size, layout=ctx.layout,
            on_forward=on_forward,
        )  # fmt: skip


def _ranked(table: pd.DataFrame, by: str) -> pd.DataFrame:
    out = table.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)
    out["rank"] = range(1, len(out) + 1)
    return out


def select_heads(table: pd.DataFrame, k: int) -> list[Head]:
    """The ``k`` best heads of a :func:`pursuit_scores` / :func:`sweep_scores` table."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > len(table):
        raise ConfigError(f"asked for {k} heads but the table scores only {len(table)}")
    top = table.sort_values("rank").head(k)
    return [(int(r.layer), int(r.head)) for r in top.itertuples()]
