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

__all__ = ["CachedValidation", "cached_metrics", "extract", "make_cached_validation_callback"]


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


CHUNK = 1024  # cached inputs run through the model this many at a time


def cached_metrics(cached: CachedValidation) -> tuple[float, float]:
    """(loss, accuracy) of `cached.model` on the cached inputs: Keras' sparse categorical
    cross-entropy, the mean over every image (what `evaluate` reports), without `evaluate`'s
    fixed cost per call (its data adapter, step function and callbacks: ~0.1 s an epoch here).
    """
    import keras

    losses: list[np.ndarray] = []
    hits = 0
    for start in range(0, len(cached.y), CHUNK):
        probs = cached.model(cached.x[start : start + CHUNK], training=False)
        labels = cached.y[start : start + CHUNK]
        losses.append(keras.ops.convert_to_numpy(keras.ops.sparse_categorical_crossentropy(labels, probs)))
        hits += int(np.sum(np.argmax(keras.ops.convert_to_numpy(probs), axis=-1) == labels))
    total = max(1, len(cached.y))
    return float(np.concatenate(losses).astype(np.float64).sum() / total) if losses else 0.0, hits / total


def make_cached_validation_callback(cached: CachedValidation) -> Any:
    """A callback that puts val_loss/val_accuracy into the epoch's logs from `cached` (never trained)."""
    import keras

    class CachedValidationCallback(keras.callbacks.Callback):  # type: ignore[misc]
        """Puts val_loss/val_accuracy into the epoch's logs before any other callback reads them."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            loss, accuracy = cached_metrics(cached)
            if logs is not None:
                logs["val_loss"] = loss
                logs["val_accuracy"] = accuracy

    return CachedValidationCallback()
