"""Where the per-head outputs of a model live.

For every layer headlab needs one module: the attention *output projection* (``o_proj``,
``out_proj``, ``c_proj``, ``attention.output.dense``...). Its *input* is the concatenation of the
heads' outputs, ``[batch, pos, head * d_head]``, which headlab views as
``[batch, pos, head, d_head]``. (Its output is useless for per-head work: heads are mixed there.)

A :class:`Family` is a small declarative entry that names, for one architecture family, the path of
the list of blocks and the path of the output projection inside a block. :func:`register_family`
is the one registration point; :func:`describe` turns a loaded model into a :class:`Layout`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from headlab.errors import ConfigError, HeadlabError

__all__ = [
    "Family",
    "Layout",
    "blocks_of",
    "describe",
    "families",
    "find_family",
    "input_device",
    "max_positions",
    "register_family",
    "with_position_ids",
]


@dataclass(frozen=True)
class Family:
    """How to find the per-head outputs of one architecture family.

    Attributes:
        name: a short name shown to users (``"llama"``).
        model_types: the ``config.model_type`` values this entry covers.
        layers: dotted path of the ``nn.ModuleList`` of blocks, relative to any prefix
            (``"layers"`` matches ``model.layers`` in a causal LM and ``layers`` in a bare model).
            A tuple lists alternatives tried in order (module names moved between versions).
        out_proj: dotted path, inside one block, of the attention output projection (or a tuple
            of alternatives).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str | tuple[str, ...]
    out_proj: str | tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ConfigError(f"Family {self.name!r} must list at least one config.model_type")
        if isinstance(self.model_types, str):
            object.__setattr__(self, "model_types", (self.model_types,))
        for name in ("layers", "out_proj"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Register ``family`` for its ``model_types``; the single registration point.

    Users declare a new architecture without editing headlab::

        headlab.register_family(headlab.Family(
            name="mynet", model_types=("mynet",), layers="blocks", out_proj="attn.proj"))
    """
    for mt in family.model_types:
        old = _REGISTRY.get(mt)
        if old is not None and old != family and not replace:
            raise ConfigError(
                f"model_type {mt!r} is already registered by family {old.name!r}; "
                "pass replace=True to override it"
            )
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


def families() -> list[Family]:
    """Every registered family, each once, in registration order."""
    seen: dict[str, Family] = {}
    for fam in _REGISTRY.values():
        seen.setdefault(fam.name, fam)
    return list(seen.values())


def _unsupported_message(model_type: str) -> str:
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families())
    return (
        f"headlab has no layout for model_type {model_type!r}. Supported families: {names}.\n"
        "Declare yours without editing headlab, naming the list of blocks and the attention "
        "output projection inside a block, e.g.:\n"
        "    import headlab\n"
        "    headlab.register_family(headlab.Family(name='mynet', "
        f"model_types=({model_type!r},), layers='model.layers', out_proj='self_attn.o_proj'))\n"
        "(print(model) shows the module names)."
    )


def find_family(model: nn.Module) -> Family:
    """The registered family of ``model`` (by ``config.model_type``), or a helpful error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ConfigError(
            f"{type(model).__name__} has no config.model_type; headlab works on Hugging Face "
            "transformers models. Pass family=headlab.Family(...) to describe() explicitly."
        )
    fam = _REGISTRY.get(model_type)
    if fam is None:
        raise ConfigError(_unsupported_message(model_type))
    return fam


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    nx = getattr(module, "nx", None)  # GPT-2 style Conv1D keeps weight as [in, out]
    if isinstance(nx, int):
        return nx
    raise ConfigError(
        f"the output projection {type(module).__name__} is neither nn.Linear nor a GPT-2 Conv1D; "
        "headlab cannot tell its input width"
    )


@dataclass(frozen=True)
class Layout:
    """The attention layout of one loaded model.

    Attributes:
        family: the family entry used.
        n_layers: number of attention layers.
        n_heads: query heads per layer (grouped-query attention counts query heads).
        d_head: coordinates per head (the head's "neurons").
        n_kv_heads: key/value heads per layer (``< n_heads`` under grouped-query attention).
        out_proj_names: module name of each layer's output projection.
        out_projs: the modules themselves (not compared, not hashed).
    """

    family: Family
    n_layers: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    out_proj_names: tuple[str, ...]
    out_projs: tuple[nn.Module, ...] = field(compare=False, hash=False, repr=False)

    @property
    def n_units(self) -> int:
        """Head-output width of one layer: ``n_heads * d_head``."""
        return self.n_heads * self.d_head

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_layers, n_heads, d_head)``."""
        return (self.n_layers, self.n_heads, self.d_head)

    def out_weight_columns(self, layer: int, head: int) -> torch.Tensor:
        """A view of W_O's input columns that belong to ``head`` (``[d_model, d_head]``)."""
        mod = self.out_projs[layer]
        lo, hi = head * self.d_head, (head + 1) * self.d_head
        if isinstance(mod, nn.Linear):
            return mod.weight[:, lo:hi]  # weight: [d_model, head * d_head]
        return mod.weight[lo:hi, :].T  # Conv1D weight: [head * d_head, d_model]

    def check_head(self, layer: int, head: int) -> None:
        """Raise a clear error if ``(layer, head)`` does not exist in this model."""
        if not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}"
            )
        if not 0 <= head < self.n_heads:
            raise ConfigError(
                f"head {head} is out of range in layer {layer}: this model has heads "
                f"0..{self.n_heads - 1}"
            )

    def heads(self) -> list[tuple[int, int]]:
        """Every ``(layer, head)`` pair, layer-major."""
        return [(ly, h) for ly in range(self.n_layers) for h in range(self.n_heads)]

    def signature(self) -> dict[str, object]:
        """A JSON-able description used to check saved statistics against a model."""
        return {
            "family": self.family.name,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
        }


def _find_layers(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.ModuleList]:
    for path in paths:
        hits = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and (name == path or name.endswith("." + path))
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(
                f"several nn.ModuleLists match {path!r} in {type(model).__name__} "
                f"({', '.join(n for n, _ in hits)}); declare a Family whose `layers` path names "
                "the blocks uniquely (e.g. 'model.decoder.layers')"
            )
    raise ConfigError(
        f"no nn.ModuleList named {' or '.join(map(repr, paths))} in {type(model).__name__}; "
        "declare a Family whose `layers` path names the list of blocks (print(model) shows it)"
    )


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise AttributeError(part)
        module = getattr(module, part)
    return module


def _n_heads(config: object) -> int:
    for attr in ("num_attention_heads", "n_head", "n_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError("could not read the number of attention heads from the model config")


def describe(model: nn.Module, family: Family | None = None) -> Layout:
    """Describe where ``model``'s per-head outputs live.

    Args:
        model: a loaded Hugging Face model.
        family: an explicit family entry; by default looked up from ``config.model_type``.
    """
    fam = family if family is not None else find_family(model)
    prefix, blocks = _find_layers(model, fam.layers)
    config = model.config
    n_heads = _n_heads(config)
    projs: list[nn.Module] = []
    names: list[str] = []
    for i, block in enumerate(blocks):
        for path in fam.out_proj:
            try:
                proj = _get(block, path)
                break
            except AttributeError:
                continue
        else:
            raise ConfigError(
                f"layer {i} ({prefix}.{i}) has no submodule {' or '.join(map(repr, fam.out_proj))}"
                f"; fix the out_proj path of family {fam.name!r} (print(model) shows the names)"
            )
        projs.append(proj)
        names.append(f"{prefix}.{i}.{path}")
    widths = {_in_features(p) for p in projs}
    if len(widths) != 1:
        raise ConfigError(f"output projections differ in input width across layers: {widths}")
    width = widths.pop()
    if width % n_heads:
        raise ConfigError(
            f"output projection input width {width} is not divisible by {n_heads} heads"
        )
    n_kv = getattr(config, "num_key_value_heads", None)
    return Layout(
        family=fam,
        n_layers=len(projs),
        n_heads=n_heads,
        d_head=width // n_heads,
        n_kv_heads=n_kv if isinstance(n_kv, int) else n_heads,
        out_proj_names=tuple(names),
        out_projs=tuple(projs),
    )


def blocks_of(model: nn.Module, layout: Layout) -> nn.ModuleList:
    """The list of blocks (decoder / encoder layers) whose ``i``-th entry holds layer ``i``'s
    output projection."""
    for _, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) == layout.n_layers
            and all(
                any(sub is proj for sub in block.modules())
                for block, proj in zip(mod, layout.out_projs, strict=True)
            )
        ):
            return mod
    raise HeadlabError(
        f"no list of blocks in {type(model).__name__} holds the output projections "
        f"{layout.out_proj_names[0]}..., so layers cannot be replayed; run without prefix reuse"
    )


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes for ``model``'s forward: the one place headlab decides it.

    For a model dispatched by accelerate (``load_model(..., device_map=...)``), the execution
    device of its input embedding (its parameters may sit on the ``meta`` device when offloaded,
    and the blocks on other devices); otherwise the device of its first parameter.
    """
    embed = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        embed = model.get_input_embeddings()
    if getattr(model, "hf_device_map", None) is not None and isinstance(embed, nn.Module):
        name = next((n for n, m in model.named_modules() if m is embed), None)
        while name is not None:  # the embedding, then each module holding it
            device = _execution_device(getattr(model.get_submodule(name), "_hf_hook", None))
            if device is not None:
                return device
            name = name.rpartition(".")[0] if name else None
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _execution_device(hook: object) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first hook of a chain that has one)."""
    device = getattr(hook, "execution_device", None)
    if device is None:
        for inner in getattr(hook, "hooks", ()):
            device = _execution_device(inner)
            if device is not None:
                return device
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def max_positions(model: nn.Module) -> int | None:
    """The model's context length from its config (``None`` if it declares none)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_position(model: nn.Module) -> tuple[int, int]:
    """``(position of a row's first real token, position given to padding)``.

    0 and 0, except for models numbering positions after a padding row of their learned position
    table (RoBERTa and its descendants: ``position_embeddings`` has a ``padding_idx``; unpadded,
    they number tokens ``padding_idx + 1, padding_idx + 2, ...``).
    """
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Embedding) and table.padding_idx is not None:
            return table.padding_idx + 1, table.padding_idx
    return 0, 0


def call_model(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: object) -> object:
    """``model(**inputs, **kwargs)``: the one way headlab runs a model's own forward.

    Adds the position ids of a left-padded batch (:func:`with_position_ids`) and turns the
    key/value cache off where the model has one (nothing reads it; it only costs memory).
    """
    inputs = with_position_ids(model, inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return model(**inputs, **kwargs)


def with_position_ids(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` for ``model``'s forward, plus the ``position_ids`` of a left-padded batch.

    Most families number positions ``0..pos-1`` by column, so a row with padding before its real
    tokens would put them at shifted positions (learned absolute positions, GPT-2 and BERT, change
    the numbers). Where the attention mask has padding before a real token, this adds position ids
    that count real tokens only (``attention_mask.cumsum(1) - 1``, padding at 0), so every row gets
    the numbers of the same example unpadded. Unpadded and right-padded inputs, and inputs that
    already carry ``position_ids``, are returned unchanged (a new dict).

    The one place headlab builds positions: ``Batch.model_inputs(model)``, the engine's forward
    and :func:`headlab.record` all go through it.

    Raises:
        ConfigError: the batch is left-padded but ``model.forward`` takes no ``position_ids``.
    """
    out = dict(inputs)
    mask, ids = out.get("attention_mask"), out.get("input_ids")
    if mask is None or ids is None or "position_ids" in out or mask.ndim != 2:
        return out
    count = mask.long().cumsum(1)  # [batch, pos]: real tokens up to and including each column
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # [pos]
    if not bool(((count != columns) & mask.bool()).any()):
        return out  # every real token sits at its column: the default positions are right
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"this batch is left-padded (padding before real tokens), but "
            f"{type(model).__name__}.forward takes no position_ids, so its tokens would sit at "
            "shifted positions and give other numbers than unpadded; pad on the right instead "
            "(or pass unpadded batches of one length)"
        )
    first, pad = _first_position(model)
    positions = (count - 1 + first).masked_fill(mask == 0, pad)  # [batch, pos]
    out["position_ids"] = positions.to(ids.device)
    return out
