"""Building the network: bases by name, weights files, embedded preprocessing, freezing."""

from __future__ import annotations

import importlib
from pathlib import Path

import keras
import numpy as np
import pytest
from finetune_contract.spec import ModelSpec
from finetune_trainer import model
from finetune_trainer.errors import InvalidSpecError

SHAPE = (32, 32, 3)


def _spec(base: str = "VGG16", weights: str = "none", **options: float) -> ModelSpec:
    return ModelSpec(base=base, weights=weights, input_shape=SHAPE, base_options=dict(options), head={"units": [8]})


@pytest.mark.parametrize("name", ["NotAModel", "vgg16", "imagenet_utils", "_private"])
def test_unknown_base_is_invalid_spec(name: str) -> None:
    with pytest.raises(InvalidSpecError, match=r"spec\.model\.base: .* is not a keras\.applications model"):
        model.application(name=name)


@pytest.mark.parametrize(("base", "options"), [("VGG16", {}), ("MobileNetV2", {"alpha": 0.35})])
def test_model_embeds_the_base_preprocessing(base: str, options: dict[str, float], float32_policy: None) -> None:
    net = model.build_network(spec=_spec(base, **options), num_classes=3)
    constructor = model.application(name=base)
    preprocess = importlib.import_module(constructor.__module__).preprocess_input
    x = np.random.default_rng(0).uniform(0, 255, (2, *SHAPE)).astype(np.float32)
    expected = np.asarray(net.base(preprocess(x.copy()), training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(net.features(x)), expected, rtol=1e-4, atol=1e-5)
    probs = np.asarray(net.model(x))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the head model shares the full model's head layers
    np.testing.assert_allclose(np.asarray(net.head(np.asarray(net.features(x)))), probs, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in net.model.layers][-3:] == ["head_dense_0", "head_dropout", "predictions"]


def test_output_is_float32_under_mixed_precision(float32_policy: None) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    net = model.build_network(spec=_spec("MobileNetV2", alpha=0.35), num_classes=2)
    assert net.model.get_layer("head_dense_0").compute_dtype == "float16"
    assert net.model.get_layer("predictions").compute_dtype == "float32"
    assert net.model.get_layer("preprocess").compute_dtype == "float32"
    assert keras.backend.standardize_dtype(net.model(np.zeros((1, *SHAPE), np.float32)).dtype) == "float32"


def test_unfreeze_last_skips_batch_norm(float32_policy: None) -> None:
    net = model.build_network(spec=_spec("MobileNetV2", alpha=0.35), num_classes=2)
    assert not net.base.trainable
    assert [w.path for w in net.model.trainable_weights] == [
        "head_dense_0/kernel",
        "head_dense_0/bias",
        "predictions/kernel",
        "predictions/bias",
    ]
    # MobileNetV2 ends: ... Conv_1, Conv_1_bn (BatchNormalization), out_relu
    assert model.unfreeze_last(net.base, count=3) == ["Conv_1"]
    assert net.base.get_layer("Conv_1").trainable
    assert not net.base.get_layer("Conv_1_bn").trainable
    assert model.fine_tune_layers(net.base) == ["Conv_1"]
    assert model.unfreeze_last(net.base, count=0) == []
    model.freeze_base(net.base)
    assert model.fine_tune_layers(net.base) == []


def test_weights_file_loads_and_mismatch_is_invalid_spec(tmp_path: Path, float32_policy: None) -> None:
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=SHAPE)
    path = tmp_path / "vgg16-notop.weights.h5"
    vgg.save_weights(path)
    base = model.build_base(spec=_spec("VGG16", weights=str(path)))
    for mine, theirs in zip(base.get_weights(), vgg.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(InvalidSpecError, match=r"spec\.model\.weights: .*vgg16-notop\.weights\.h5 does not fit MobileNetV2"):
        model.build_base(spec=_spec("MobileNetV2", weights=str(path), alpha=0.35))
    with pytest.raises(InvalidSpecError, match=r"spec\.model\.weights: .*missing\.h5 is not a file"):
        model.build_base(spec=_spec("VGG16", weights=str(tmp_path / "missing.h5")))


def test_bad_base_options_are_invalid_spec(float32_policy: None) -> None:
    with pytest.raises(InvalidSpecError, match=r"spec\.model\.baseOptions: VGG16 rejects them"):
        model.build_base(spec=_spec("VGG16", alpha=0.5))


@pytest.mark.parametrize(
    ("base", "options", "unfreeze", "cut"),
    [("VGG16", {}, 4, "block4_pool"), ("MobileNetV2", {"alpha": 0.35}, 3, "block_16_project_BN")],
)
def test_split_below_trainable_is_the_same_function(
    base: str, options: dict[str, float], unfreeze: int, cut: str, float32_policy: None
) -> None:
    net = model.build_network(spec=_spec(base, **options), num_classes=3)
    model.unfreeze_last(net.base, count=unfreeze)
    split = model.split_below_trainable(net)
    assert split is not None and split.cut == cut
    x = np.random.default_rng(1).uniform(0, 255, (2, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(split.rest(split.prefix(x))), np.asarray(net.model(x)), rtol=1e-5, atol=1e-6)
    # the part that trains is the same set of variables as in the full model
    assert sorted(w.path for w in split.rest.trainable_weights) == sorted(w.path for w in net.model.trainable_weights)
    assert not split.prefix.trainable_weights


def test_no_split_when_everything_trains(float32_policy: None) -> None:
    net = model.build_network(spec=_spec("VGG16"), num_classes=2)
    model.unfreeze_last(net.base, count=1000)
    assert model.split_below_trainable(net) is None
