"""Feature caching: what a frozen part of the network computes from unchanging images, once.

`extract` runs a frozen model (the base's pooled features, or the frozen prefix below the
first unfrozen layer) over an image set once; `CachedValidation` and its callback validate
on those cached inputs each epoch with the model that maps them to class probabilities
(sharing its layers with the trained model), instead of a full forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune_trainer import data as data_lib

__all__ = ["CachedValidation", "extract", "make_cached_validation_callback"]


@dataclass
class CachedValidation:
    """Validation on inputs computed once (pooled features, or the frozen prefix's output)."""

    model: Any  # maps the cached inputs to class probabilities, sharing layers with the trained model
    x: np.ndarray
    y: np.ndarray
    batch_size: int


def extract(*, model: Any, images: data_lib.ImageSet, batch_size: int) -> np.ndarray:
    """`model`'s outputs for every image of `images`, in order, as float32."""
    ds = data_lib.make_dataset(images=images, batch_size=batch_size, shuffle=False, seed=0)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float32)


def make_cached_validation_callback(cached: CachedValidation) -> Any:
    """A callback that puts val_loss/val_accuracy into the epoch's logs from `cached`.

    `cached.model` must be compiled (for its loss and metrics; it is never trained).
    """
    import keras

    class CachedValidationCallback(keras.callbacks.Callback):  # type: ignore[misc]
        """Puts val_loss/val_accuracy into the epoch's logs before any other callback reads them."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            result = cached.model.evaluate(cached.x, cached.y, batch_size=cached.batch_size, verbose=0, return_dict=True)
            if logs is not None:
                logs["val_loss"] = float(result["loss"])
                logs["val_accuracy"] = float(result["accuracy"])

    return CachedValidationCallback()
