"""Image batches: scikit-learn's digits for the named vision model ``digits-vit``.

``--data digits`` (the default of ``digits-vit``) takes the evaluation images from the held-out
split (450 images) and the statistics images from the training split (1,347 images), so the two
never share an image; the split is the one the model was trained with
(:func:`headlab.models.digits.digits_split`). ``--n-blocks`` and ``--n-stats-blocks`` count images;
``--seed`` shuffles which images come first. Batches carry ``pixel_values`` ``[image, 1, 8, 8]`` and
class ``labels``, scored by ``cls_ce`` and ``cls_acc``.
"""

from __future__ import annotations

import torch
from torch import nn

from headlab.batch import Batch
from headlab.errors import ConfigError

__all__ = ["DIGITS", "IMAGE_METRICS", "digits_batches", "image_batches"]

#: the name of the digits image set (``--data digits``)
DIGITS = "digits"
#: what image batches are scored by
IMAGE_METRICS = ("cls_ce", "cls_acc")


def digits_batches(n_eval: int, n_stats: int, seed: int = 0) -> tuple[Batch, Batch]:
    """``n_eval`` held-out and ``n_stats`` training images of the digits split, each split's
    order shuffled with ``seed``."""
    from headlab.models.digits import digits_split

    split = digits_split()
    out = []
    for n, x, y, where, option in (
        (n_eval, split.test_x, split.test_y, "held-out", "--n-blocks"),
        (n_stats, split.train_x, split.train_y, "training", "--n-stats-blocks"),
    ):
        if n > len(y):
            raise ConfigError(
                f"the digits {where} split has {len(y)} images but {option} asks for {n}; use "
                f"{option} {len(y)} (all of them) or fewer"
            )
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        out.append(Batch(pixel_values=x[order], labels=y[order]))  # [image, 1, 8, 8], [image]
    return out[0], out[1]


def image_batches(
    data: str | None,
    model: nn.Module,
    name: str,
    *,
    n_eval: int,
    n_stats: int,
    seed: int,
    default: str | None = None,
    stats_data: str | None = None,
) -> tuple[str, Batch, Batch]:
    """``(data name, evaluation, statistics)`` for the vision model ``model`` (called ``name``).

    ``data`` is the image set to read; ``None`` or the text default ``python-docs`` mean the
    model's own ``default`` (``digits`` for ``digits-vit``).

    Raises:
        ConfigError: a text corpus, an image set the model cannot read, or no image set.
    """
    if data in (None, "python-docs"):  # no data chosen (python-docs is the text default)
        if default is None:
            raise ConfigError(
                f"{name} is a vision model, and the only built-in image set is {DIGITS!r} "
                "(8x8 digits, for --model digits-vit); use the Python API with your own Batch of "
                "pixel_values"
            )
        data = default
    if data != DIGITS:
        raise ConfigError(
            f"{name} is a vision model: it reads images, not the text corpus {data!r}; use "
            f"--data {DIGITS} (scikit-learn's 8x8 digits, the default of --model digits-vit), or "
            "the Python API with your own Batch of pixel_values"
        )
    if stats_data not in (None, DIGITS):
        raise ConfigError(
            f"--stats-data {stats_data}: statistics of {DIGITS} come from its training split; "
            "drop --stats-data"
        )
    config = model.config
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if (size, channels) != (8, 1):
        raise ConfigError(
            f"--data {DIGITS} holds 8x8 grey images (1 channel), but {name} takes {size}x{size} "
            f"images with {channels} channels; use --model digits-vit"
        )
    evaluation, stats = digits_batches(n_eval, n_stats, seed)
    return DIGITS, evaluation, stats
