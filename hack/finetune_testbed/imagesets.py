"""Tiny generated class-per-folder image sets and specs for the trainer's tests.

Classes differ by colour and shape (a filled disc, a square, horizontal stripes), with
random positions, sizes and noise, so a small network separates them in a few epochs and
nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("circle", "square", "stripes")
_COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (50, 70, 230)}


def draw(kind: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class `kind`."""
    img = rng.normal(110, 25, (size, size, 3)).clip(0, 255)
    colour = np.array(_COLOURS[kind], dtype=np.float64) + rng.normal(0, 12, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    r = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    elif kind == "square":
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    else:
        period = max(2, size // 6)
        mask = ((yy + int(rng.integers(0, period))) // (period // 2 or 1)) % 2 == 0
    img[mask] = colour
    return img.astype(np.uint8)


def _write_folders(
    root: Path, *, classes: Sequence[str], per_class: int, seed: int, fmt: str,
    paint: Callable[[str, np.random.Generator], np.ndarray],
) -> Path:
    """Writes `root/<class>/<i>.<fmt>`, each image `paint(class, rng)` from one generator seeded `seed`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(paint(kind, rng)).save(folder / f"{i:03d}.{fmt}")
    return root


def write_image_folder(
    root: Path,
    *,
    per_class: int,
    size: int = 32,
    classes: Sequence[str] = CLASSES,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Writes `root/<class>/<i>.<fmt>` images (disc, square, stripes; other names map onto them) and returns root."""
    return _write_folders(
        root, classes=classes, per_class=per_class, seed=seed, fmt=fmt,
        paint=lambda kind, rng: draw(kind if kind in _COLOURS else CLASSES[sum(map(ord, kind)) % 3], size=size, rng=rng),
    )


SQUARE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


def draw_square(name: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image: a square of colour SQUARE_COLOURS[name] on noise."""
    img = rng.normal(110, 25, (size, size, 3))
    half = int(rng.integers(size // 6, size // 3))
    cy, cx = rng.integers(half, size - half, 2)
    img[cy - half : cy + half, cx - half : cx + half] = np.array(SQUARE_COLOURS[name]) + rng.normal(0, 12, 3)
    return img.clip(0, 255).astype(np.uint8)


def write_square_folder(
    root: Path, *, per_class: int, seed: int, size: int = 32, classes: Sequence[str] = tuple(SQUARE_COLOURS)
) -> Path:
    """root/<class>/<i>.png: classes told apart by the colour of a square on noise (red, green, blue)."""
    return _write_folders(root, classes=classes, per_class=per_class, seed=seed, fmt="png",
                          paint=lambda name, rng: draw_square(name, size=size, rng=rng))


def spec_dict(
    *,
    train: Path,
    output: Path,
    validation: Path | None = None,
    validation_split: float | None = None,
    base: str = "MobileNetV2",
    base_options: dict[str, Any] | None = None,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    weights: str = "none",
    head_epochs: int = 3,
    fine_epochs: int = 1,
    unfreeze_last: int = 4,
    head_lr: float = 1e-3,
    fine_lr: float = 1e-5,
    augmentation: bool = False,
    batch_size: int = 16,
    patience: int = 5,
    plateau_patience: int | None = None,
    units: Sequence[int] = (32,),
) -> dict[str, Any]:
    """A bare FineTuneJob spec (camelCase, as users type it) for a tiny run."""
    data: dict[str, Any] = {"train": str(train), "augmentation": {"enabled": augmentation}}
    if validation is not None:
        data["validation"] = str(validation)
    if validation_split is not None:
        data["validationSplit"] = validation_split
    return {
        "model": {
            "base": base,
            "weights": weights,
            "inputShape": list(input_shape),
            "baseOptions": base_options if base_options is not None else ({"alpha": 0.35} if base == "MobileNetV2" else {}),
            "head": {"units": list(units), "dropout": 0.2},
        },
        "data": data,
        "training": {
            "batchSize": batch_size,
            "head": {"epochs": head_epochs, "learningRate": head_lr},
            "fineTune": {"epochs": fine_epochs, "learningRate": fine_lr, "unfreezeLast": unfreeze_last},
            "earlyStopping": {"patience": patience, "restoreBestWeights": True},
            **({"reduceLROnPlateau": {"patience": plateau_patience}} if plateau_patience is not None else {}),
            "mixedPrecision": "off",
            "seed": 7,
        },
        "output": {"path": str(output)},
    }
