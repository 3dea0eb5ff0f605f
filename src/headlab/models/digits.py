"""The named vision model ``digits-vit``: a small ViT trained in-process on scikit-learn's digits.

scikit-learn ships ``load_digits`` (1,797 grey 8 x 8 images of the digits 0-9, 16 grey levels)
inside its wheel, so the model needs nothing from the network. :data:`RECIPE` fixes everything:
the split (a stratified 75 / 25 split with a fixed seed: 1,347 training and 450 held-out images),
the architecture (patches of 2 x 2 pixels: 16 patches plus the class token, 4 layers of 6 heads of
8 dimensions) and the optimisation (AdamW, cosine schedule). Training runs on one CPU thread with
fixed seeds and no dropout, so it is deterministic on a given machine (the same weights bit for
bit); it reaches 96.9 % on the held-out split in 2-4 minutes on one thread of a shared CPU.

The first load trains it and writes a float32 safetensors folder under
:func:`~headlab.models.default.cache_dir` (``models/digits-vit``), atomically; a marker written
last records the recipe, so a changed recipe retrains. ``tests/fixtures/digits_vit`` holds the same
weights for the tests.

Pixels enter the model as ``value / 16 * 2 - 1`` (in ``[-1, 1]``), one channel:
:func:`digits_split` returns them so, ``[image, 1, 8, 8]``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from headlab.errors import ModelNotFoundError

__all__ = ["RECIPE", "DigitsSplit", "Recipe", "digits_accuracy", "digits_folder", "digits_split",
           "train_digits_vit"]  # fmt: skip

NAME = "digits-vit"
_MARKER = "headlab-source.json"  # written last inside the folder: its presence means complete


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights."""

    split_seed: int = 0
    test_fraction: float = 0.25
    patch_size: int = 2
    hidden_size: int = 48
    num_layers: int = 4
    num_heads: int = 6
    mlp_size: int = 96
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0


RECIPE = Recipe()


@dataclass(frozen=True, eq=False)
class DigitsSplit:
    """The fixed split: ``[image, 1, 8, 8]`` pixels in ``[-1, 1]`` and ``[image]`` labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_split(recipe: Recipe = RECIPE) -> DigitsSplit:
    """scikit-learn's digits, split 75 / 25 (stratified by class, ``recipe.split_seed``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ModelNotFoundError(
            f"{NAME!r} trains on scikit-learn's digits, and scikit-learn is not installed; "
            "install it with `pip install scikit-learn`"
        ) from err
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32) / 16.0 * 2.0 - 1.0  # [image, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        list(range(len(labels))), test_size=recipe.test_fraction,
        random_state=recipe.split_seed, stratify=digits.target,
    )  # fmt: skip
    train_i, test_i = torch.tensor(train), torch.tensor(test)
    return DigitsSplit(
        pixels[train_i, None], labels[train_i], pixels[test_i, None], labels[test_i]
    )  # [image, 1, 8, 8] each


def _config(recipe: Recipe) -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8, patch_size=recipe.patch_size, num_channels=1,
        hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, intermediate_size=recipe.mlp_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
        id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
        architectures=["ViTForImageClassification"],
    )  # fmt: skip


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """One CPU thread and a private random state for the duration (both restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split over threads would change the last bits
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def train_digits_vit(
    recipe: Recipe = RECIPE, *, on_epoch: Callable[[int], None] | None = None
) -> Any:
    """Train the ViT of ``recipe`` on the training split and return it (eval mode, on the CPU).

    Deterministic: fixed seeds, no dropout, one CPU thread (the global random state and thread
    count are restored afterwards). ``on_epoch`` is called with each finished epoch's number.
    """
    from transformers import ViTForImageClassification

    split = digits_split(recipe)
    x, y = split.train_x, split.train_y
    steps_per_epoch = math.ceil(len(y) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch

    def rate(step: int) -> float:  # linear warm-up, then a cosine down to 0
        return (
            min(1.0, (step + 1) / recipe.warmup_steps)
            * 0.5
            * (1 + math.cos(math.pi * step / total))
        )

    with _deterministic():
        torch.manual_seed(recipe.seed)
        model = ViTForImageClassification(_config(recipe))
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
        order = torch.Generator().manual_seed(recipe.seed)
        model.train()
        for epoch in range(recipe.epochs):
            perm = torch.randperm(len(y), generator=order)
            for start in range(0, len(y), recipe.batch_size):
                idx = perm[start : start + recipe.batch_size]
                loss = model(pixel_values=x[idx], labels=y[idx]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
            if on_epoch is not None:
                on_epoch(epoch + 1)
    model.eval()
    model.requires_grad_(False)
    return model


def digits_accuracy(model: Any, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``pixels`` ``[image, 1, 8, 8]`` against ``labels``."""
    with torch.no_grad():
        logits = model(pixel_values=pixels.to(model.device)).logits  # [image, 10]
    return float((logits.argmax(-1).cpu() == labels).double().mean())


def digits_folder(on_status: Callable[[str], None] | None = None, progress: bool = False) -> Path:
    """The cached folder of ``digits-vit``, training it first if it is missing or was trained
    with another recipe (a few minutes, once)."""
    from headlab.models.default import _atomic_folder, cache_dir

    folder = cache_dir() / "models" / NAME
    recipe = asdict(RECIPE)
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == recipe:
        return folder
    if on_status is not None:
        on_status(f"training {NAME} on scikit-learn's digits into {folder} (once; a few minutes)")
    model = train_digits_vit(RECIPE)
    split = digits_split(RECIPE)
    accuracy = digits_accuracy(model, split.test_x, split.test_y)
    with _atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        source = {"recipe": recipe, "test_accuracy": accuracy, "test_images": len(split.test_y)}
        (tmp / _MARKER).write_text(json.dumps(source, indent=2))
    if on_status is not None:
        on_status(f"trained {NAME}: {accuracy:.1%} on the {len(split.test_y)} held-out images")
    return folder
