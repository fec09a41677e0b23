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

__all__ = ["CachedValidation", "cached_metrics", "extract", "make_cached_validation_callback", "run_model", "validation_metrics"]


@dataclass
class CachedValidation:
    """Validation on inputs computed once (pooled features, or the frozen prefix's output)."""

    model: Any  # maps the cached inputs to class probabilities, sharing layers with the trained model
    x: np.ndarray
    y: np.ndarray
    batch_size: int


EAGER_MAX_IMAGES = 512  # up to this many decoded images, `extract` calls the model directly
CHUNK_BYTES = 32 << 20  # the float32 inputs of one direct call, at most (at least MIN_CHUNK items)
MIN_CHUNK, MAX_CHUNK = 16, 1024


def run_model(*, model: Any, x: np.ndarray) -> np.ndarray:
    """`model`'s outputs for `x` (float32 on the way in), called directly in chunks, as float32.

    No `predict`: each `predict` of a model not seen before traces a step function (seconds for
    a deep base), which costs more than it saves over a few hundred inputs.
    """
    import keras

    per_item = max(1, int(np.prod(x.shape[1:])) * 4)
    chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_BYTES // per_item)))
    outputs = [
        keras.ops.convert_to_numpy(model(x[start : start + chunk].astype(np.float32, copy=False), training=False))
        for start in range(0, len(x), chunk)
    ]
    return np.concatenate(outputs).astype(np.float32, copy=False)


def extract(*, model: Any, images: data_lib.ImageSet, batch_size: int) -> np.ndarray:
    """`model`'s outputs for every image of `images`, in order, as float32.

    A few hundred decoded images go through `run_model`; more, or streamed ones, through
    `predict` over the input pipeline (its trace pays for itself there).
    """
    if images.images is not None and len(images) <= EAGER_MAX_IMAGES:
        return run_model(model=model, x=images.images)
    ds = data_lib.make_dataset(images=images, batch_size=batch_size, shuffle=False, seed=0)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float32)


def validation_metrics(*, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Sparse categorical cross-entropy (probabilities clipped at 1e-7) and accuracy of `probs` against `labels`."""
    picked = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {"loss": float(-np.log(picked).mean()), "accuracy": float((probs.argmax(axis=1) == labels).mean())}


def cached_metrics(cached: CachedValidation) -> tuple[float, float]:
    """(loss, accuracy) of `cached.model` on the cached inputs: the mean over every image (what
    `evaluate` reports), without `evaluate`'s fixed cost per call (its data adapter, step
    function and callbacks: ~0.1 s an epoch here).
    """
    if not len(cached.y):
        return 0.0, 0.0
    result = validation_metrics(probs=run_model(model=cached.model, x=cached.x), labels=cached.y)
    return result["loss"], result["accuracy"]


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
