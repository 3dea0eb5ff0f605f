"""Generation with some heads rescaled: :func:`rescaled` (a context manager) and seeded,
batched, left-padded generation (:func:`generate_ids`, :func:`generate_texts`).

:func:`rescaled` multiplies the chosen heads' outputs (``[batch, pos, head, d_head]``, the input of
the output projection) by ``alpha`` for every forward inside it — ``model.generate`` included: with
a key/value cache each new token passes through the hook at its own position, so the whole
sequence is steered. ``alpha = 1`` changes nothing (bit for bit), ``0`` removes the heads, ``-1``
flips them, ``> 1`` amplifies them.

Sampling is seeded per prompt batch (``torch.manual_seed(seed + b)`` for batch ``b``, inside a
forked RNG), so a condition's generations do not depend on what ran before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from headlab.data.blocks import bos_prefix
from headlab.errors import ConfigError
from headlab.heads import Head
from headlab.hooks import HookReport, intervene
from headlab.interventions import Plan, Scale
from headlab.models.layout import Layout, input_device, max_positions

__all__ = [
    "GenerateConfig",
    "encode_prompts",
    "generate_ids",
    "generate_texts",
    "rescaled",
]


@contextmanager
def rescaled(
    model: nn.Module,
    heads: Sequence[Head],
    alpha: float,
    *,
    layout: Layout | None = None,
    check_fired: bool = True,
) -> Iterator[HookReport]:
    """Multiply ``heads``' outputs by ``alpha`` inside the block (``model.generate`` too)::

    with headlab.rescaled(model, [(9, 3), (12, 0)], alpha=5.0):
        out = model.generate(**enc, max_new_tokens=20)
    """
    if not heads:
        raise ConfigError("rescaled() needs at least one (layer, head) to scale")
    plan = Plan.heads([tuple(h) for h in heads], Scale(float(alpha)))
    with intervene(model, plan, layout=layout, check_fired=check_fired) as report:
        yield report


@dataclass(frozen=True)
class GenerateConfig:
    """How to sample: ``greedy`` decoding, or seeded sampling at ``temperature`` from the
    ``top_k`` most likely tokens (0: all) within nucleus ``top_p``; ``batch_size`` prompts per
    ``generate`` call (left-padded)."""

    max_new_tokens: int = 24
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}; use greedy")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


def _hf_config(config: GenerateConfig, pad: int, eos: int | None) -> Any:
    from transformers import GenerationConfig

    kw: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "do_sample": not config.greedy,
    }
    if not config.greedy:
        kw.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    return GenerationConfig(**kw)


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerateConfig,
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    heads: Sequence[Head] = (),
    alpha: float = 1.0,
    layout: Layout | None = None,
) -> list[list[int]]:
    """The new tokens generated after each prompt (token lists), with ``heads`` rescaled by
    ``alpha`` (none: the clean model). Prompts are left-padded in batches of
    ``config.batch_size``; batch ``b`` samples with ``torch.manual_seed(config.seed + b)`` inside
    a forked RNG (the caller's random state is untouched). ``model.generate`` numbers each row's
    positions from the attention mask, so a padded prompt gives the logits it gives alone."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("give at least one prompt, and no empty prompt")
    limit = max_positions(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + config.max_new_tokens > limit:
        raise ConfigError(
            f"a prompt of {longest} tokens plus {config.max_new_tokens} new tokens exceeds the "
            f"model's context of {limit} positions; shorten the prompt or lower max_new_tokens"
        )
    device = input_device(model)
    gc = _hf_config(config, pad_token_id, eos_token_id)
    out: list[list[int]] = []
    cuda = [device] if device.type == "cuda" else []
    for b, start in enumerate(range(0, len(prompts), config.batch_size)):
        chunk = prompts[start : start + config.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)  # [batch, pos]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: the last token is real in every row
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
        steer_ctx = rescaled(model, heads, alpha, layout=layout) if heads else nullcontext()
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), steer_ctx:
            torch.manual_seed(config.seed + b)
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc
            )
        out.extend(seqs[:, width:].cpu().tolist())  # [batch, new]
    return out


def encode_prompts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt (after BOS where the tokenizer adds one), refused if a prompt is
    empty or it and ``max_new_tokens`` do not fit in the model's context."""
    if not prompts:
        raise ConfigError("no prompts to generate from; give at least one")
    prefix = bos_prefix(tokenizer)
    encoded = [prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    limit = max_positions(model)
    for p, e in zip(prompts, encoded, strict=True):
        if not e:
            raise ConfigError(f"prompt {p!r} has no tokens; remove it")
        if limit is not None and len(e) + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {p[:60]!r}... is {len(e)} tokens; with {max_new_tokens} new tokens it "
                f"exceeds the model's context of {limit}; shorten it or lower max_new_tokens"
            )
    return encoded


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    config: GenerateConfig,
    *,
    heads: Sequence[Head] = (),
    alpha: float = 1.0,
    layout: Layout | None = None,
) -> list[str]:
    """The text generated after each prompt (special tokens dropped); see :func:`generate_ids`."""
    encoded = encode_prompts(model, tokenizer, prompts, config.max_new_tokens)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    new = generate_ids(
        model,
        encoded,
        config,
        pad_token_id=pad,
        eos_token_id=eos,
        heads=heads,
        alpha=alpha,
        layout=layout,
    )
    return tokenizer.batch_decode(new, skip_special_tokens=True)
