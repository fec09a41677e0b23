"""The network: a keras.applications base with its own preprocessing inside, and a new head.

    raw RGB 0-255 -> preprocess (a frozen 1x1 convolution) -> base(training=False)
        -> GlobalAveragePooling2D -> Dense(relu)... -> Dropout -> Dense(softmax, float32)

Each application's `preprocess_input` is a per-pixel affine map (scaling, mean/std, RGB to
BGR); it is measured once on probe pixels and baked into a non-trainable 1x1 Conv2D, so the
saved model holds only built-in layers and loads anywhere without this package. The head's
layers are shared with a second model that starts at the pooled features, so the fast path
can train the very same layers on features extracted once.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from finetune_contract.spec import ModelSpec

from finetune_trainer.errors import InvalidSpecError

__all__ = [
    "Network",
    "Split",
    "application",
    "build_network",
    "fine_tune_layers",
    "freeze_base",
    "split_below_trainable",
    "unfreeze_last",
]


@dataclass
class Network:
    """The full model and the views of it the two phases train."""

    model: Any  # keras.Model: raw images -> class probabilities
    base: Any  # keras.Model: the pretrained base
    features: Any  # keras.Model: raw images -> pooled base features
    head: Any  # keras.Model: pooled features -> class probabilities (layers shared with `model`)
    preprocess: Any | None  # the embedded preprocessing layer, if any
    pool: Any  # the GlobalAveragePooling2D layer
    head_layers: list[Any]  # Dense..., Dropout, Dense(softmax), in order

    def apply_head(self, tensor: Any) -> Any:
        """Runs a tensor of pooled features through the head's own layers."""
        for layer in self.head_layers:
            tensor = layer(tensor)
        return tensor


def application(*, name: str) -> Callable[..., Any]:
    """The keras.applications constructor called `name`; InvalidSpecError when there is none."""
    import keras

    constructor = getattr(keras.applications, name, None) if not name.startswith("_") else None
    if constructor is None or inspect.ismodule(constructor) or not callable(constructor):
        raise InvalidSpecError(f"spec.model.base: {name!r} is not a keras.applications model (e.g. VGG16, MobileNetV2)")
    return constructor  # type: ignore[no-any-return]


def _affine_of(fn: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(M, b) with fn(x) == M @ x + b per pixel, measured on probe pixels; None if fn is not affine."""
    probe = np.array(
        [[[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [12.5, 200.0, 77.0], [255, 255, 255]]]],
        dtype=np.float32,
    )
    out = np.asarray(fn(probe.copy()), dtype=np.float64).reshape(-1, 3)
    bias = out[0]
    matrix = np.stack([(out[i + 1] - bias) / 255.0 for i in range(3)], axis=1)
    for k in (4, 5):
        expected = matrix @ probe.reshape(-1, 3)[k].astype(np.float64) + bias
        if not np.allclose(out[k], expected, rtol=1e-4, atol=1e-3):
            return None
    return matrix, bias


def preprocessing_layer(*, constructor: Callable[..., Any]) -> Any | None:
    """The base's own preprocess_input as a frozen 1x1 Conv2D, or None where it is the identity."""
    import keras

    module = importlib.import_module(constructor.__module__)
    preprocess = getattr(module, "preprocess_input", None)
    if preprocess is None:
        return None
    affine = _affine_of(preprocess)
    if affine is None:
        raise InvalidSpecError(
            f"spec.model.base: the preprocessing of {constructor.__name__} is not a per-pixel affine map; "
            "this trainer cannot embed it"
        )
    matrix, bias = affine
    if np.allclose(matrix, np.eye(3)) and np.allclose(bias, 0.0):
        return None
    layer = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, dtype="float32", name="preprocess")
    layer.build((None, None, None, 3))
    layer.set_weights([matrix.T.reshape(1, 1, 3, 3).astype(np.float32), bias.astype(np.float32)])
    return layer


def _first_line(exc: BaseException) -> str:
    """The gist of an exception on one line."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text[:300] if text else type(exc).__name__


def build_base(*, spec: ModelSpec) -> Any:
    """The base without its top, with weights loaded; InvalidSpecError for bad options or weights."""
    constructor = application(name=spec.base)
    weights: str | None
    weights_file: Path | None = None
    if spec.weights.lower() == "imagenet":
        weights = "imagenet"
    elif spec.weights.lower() == "none":
        weights = None
    else:
        weights_file = Path(spec.weights)
        if not weights_file.is_file():
            raise InvalidSpecError(f"spec.model.weights: {weights_file} is not a file")
        weights = None
    if spec.input_shape[2] != 3:
        raise InvalidSpecError(f"spec.model.inputShape: images are RGB, channels must be 3, got {spec.input_shape[2]}")
    try:
        base = constructor(include_top=False, weights=weights, input_shape=tuple(spec.input_shape), **spec.base_options)
    except TypeError as exc:
        raise InvalidSpecError(f"spec.model.baseOptions: {spec.base} rejects them: {_first_line(exc)}") from exc
    except ValueError as exc:
        raise InvalidSpecError(f"spec.model: {spec.base} cannot be built as given: {_first_line(exc)}") from exc
    if weights_file is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns once per unmatched layer before it raises
                base.load_weights(str(weights_file))
        except Exception as exc:  # h5py, shape and layer-count errors all mean "not this architecture"
            raise InvalidSpecError(
                f"spec.model.weights: {weights_file} does not fit {spec.base} "
                f"(inputShape {list(spec.input_shape)}, baseOptions {spec.base_options}): {_first_line(exc)}"
            ) from exc
    return base


def build_network(*, spec: ModelSpec, num_classes: int) -> Network:
    """Builds base + head under the current dtype policy; the base starts frozen."""
    import keras

    base = build_base(spec=spec)
    freeze_base(base)
    pre = preprocessing_layer(constructor=application(name=spec.base))

    inputs = keras.Input(shape=tuple(spec.input_shape), name="image")
    x = pre(inputs) if pre is not None else inputs
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D(name="pool")
    pooled = pool(x)

    head_layers: list[Any] = [
        keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}") for i, units in enumerate(spec.head.units)
    ]
    head_layers.append(keras.layers.Dropout(spec.head.dropout, name="head_dropout"))
    head_layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions"))

    network = Network(
        model=None, base=base, features=None, head=None, preprocess=pre, pool=pool, head_layers=head_layers
    )
    network.model = keras.Model(inputs, network.apply_head(pooled), name=f"finetune_{spec.base.lower()}")
    network.features = keras.Model(inputs, pooled, name="features")
    feature_input = keras.Input(shape=(int(pooled.shape[-1]),), name="features")
    network.head = keras.Model(feature_input, network.apply_head(feature_input), name="head")
    return network


@dataclass
class Split:
    """The base cut below its trainable layers: a frozen prefix whose output phase 2 can cache."""

    cut: str  # the last layer of the prefix
    prefix: Any  # keras.Model: raw images -> the cut layer's output (preprocessing included)
    rest: Any  # keras.Model: the cut layer's output -> class probabilities (suffix of the base + head)
    shape: tuple[int, ...]  # per-image shape of the cut output


def split_below_trainable(network: Network, *, max_tries: int = 64) -> Split | None:
    """Cuts the base just below its first trainable layer, at a tensor every path goes through.

    Returns None where no such cut exists (every layer trains, or a residual connection spans
    every candidate within `max_tries` layers).
    """
    import keras

    layers = list(network.base.layers)
    trainable = [i for i, layer in enumerate(layers) if layer.trainable and layer.weights]
    if not trainable:
        return None
    tries = 0
    for index in range(trainable[0] - 1, 0, -1):
        if tries >= max_tries:
            break
        tries += 1
        cut = layers[index]
        try:
            suffix = keras.Model(cut.output, network.base.output, name="base_suffix")
        except Exception:  # a tensor that skips over the cut: try one layer lower
            continue
        inputs = keras.Input(shape=network.model.input_shape[1:], name="image")
        x = network.preprocess(inputs) if network.preprocess is not None else inputs
        prefix_base = keras.Model(network.base.input, cut.output, name="base_prefix")
        prefix = keras.Model(inputs, prefix_base(x, training=False), name="prefix")
        rest_input = keras.Input(shape=tuple(cut.output.shape[1:]), name="cut")
        rest = keras.Model(
            rest_input, network.apply_head(network.pool(suffix(rest_input, training=False))), name="rest"
        )
        return Split(cut=cut.name, prefix=prefix, rest=rest, shape=tuple(int(d) for d in cut.output.shape[1:]))
    return None


def freeze_base(base: Any) -> None:
    """Phase 1: nothing in the base trains."""
    base.trainable = False


def unfreeze_last(base: Any, *, count: int) -> list[str]:
    """Phase 2: the last `count` layers of the base train, BatchNormalization excepted; returns their names."""
    import keras

    base.trainable = True
    layers = list(base.layers)
    chosen = layers[len(layers) - min(count, len(layers)) :] if count > 0 else []
    chosen_ids = {id(layer) for layer in chosen}
    names: list[str] = []
    for layer in layers:
        trainable = id(layer) in chosen_ids and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        if trainable and layer.weights:
            names.append(layer.name)
    return names


def fine_tune_layers(base: Any) -> list[str]:
    """Names of the base's layers with weights that train now."""
    return [layer.name for layer in base.layers if layer.trainable and layer.weights]
