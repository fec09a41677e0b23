"""Training in stages: which stages a spec plans, where the frozen cut falls, what each stage caches."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from finetune_contract.spec import AugmentationSpec, ModelSpec
from finetune_testbed.imagesets import spec_dict
from finetune_trainer import data as data_lib
from finetune_trainer import features as features_lib
from finetune_trainer import model as model_lib
from finetune_trainer import stages
from finetune_trainer.config import parse_config

SHAPE = (32, 32, 3)


def _plan(tmp_path: Path, **kwargs: object) -> list[stages.TrainingStage]:
    spec = parse_config(spec_dict(train=tmp_path, validation=tmp_path, output=tmp_path / "out", **kwargs))  # type: ignore[arg-type]
    return stages.plan_stages(spec=spec)


def test_the_default_plan_is_head_then_fine_tune(tmp_path: Path) -> None:
    head, fine = _plan(tmp_path, head_epochs=3, fine_epochs=2, unfreeze_last=4, head_lr=1e-3, fine_lr=1e-5)
    assert (head.name, head.epochs, head.learning_rate, head.epochs_before, head.unfreeze_last) == ("head", 3, 1e-3, 0, None)
    assert (fine.name, fine.epochs, fine.learning_rate, fine.epochs_before, fine.unfreeze_last) == ("fine-tune", 2, 1e-5, 3, 4)
    assert (head.epochs_through, fine.epochs_through) == (3, 5)
    assert head.rate_field == "spec.training.head.learningRate"
    assert fine.rate_field == "spec.training.fineTune.learningRate"


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"head_epochs": 0, "fine_epochs": 2}, ["fine-tune"]),
        ({"head_epochs": 2, "fine_epochs": 0}, ["head"]),
        ({"head_epochs": 2, "fine_epochs": 2, "unfreeze_last": 0}, ["head"]),
        ({"head_epochs": 0, "fine_epochs": 0}, []),
    ],
)
def test_a_stage_without_epochs_or_layers_is_left_out(tmp_path: Path, kwargs: dict[str, int], names: list[str]) -> None:
    assert [stage.name for stage in _plan(tmp_path, **kwargs)] == names


MB = 1 << 20


@pytest.mark.parametrize(
    ("kind", "augmented", "budget", "expected"),
    [
        (None, False, 10 * MB, "none"),  # no cut: nothing to cache
        ("features", False, 10 * MB, "features"),  # every image fits: train on cached inputs
        ("features", True, 10 * MB, "validation-features"),  # augmented images change every epoch
        ("prefix", False, 10 * MB, "prefix"),
        ("prefix", True, 10 * MB, "validation-prefix"),
        ("prefix", False, 30 * 1000 * 4, "validation-prefix"),  # only the validation images fit, exactly
        ("prefix", False, 30 * 1000 * 4 - 1, "none"),  # not even they do
        ("features", False, 130 * 1000 * 4, "features"),  # all 130 images, exactly
    ],
)
def test_the_fast_path_caches_what_fits(kind: stages.CutKind | None, augmented: bool, budget: int, expected: str) -> None:
    got = stages.choose_fast_path(kind=kind, floats_per_image=1000, n_train=100, n_validation=30,
                                  augmented=augmented, budget=budget)
    assert got == expected


def _network(base: str = "VGG16", **options: float) -> model_lib.Network:
    keras.utils.set_random_seed(5)
    spec = ModelSpec(base=base, weights="none", input_shape=SHAPE, base_options=dict(options), head={"units": [8]})
    return model_lib.build_network(spec=spec, num_classes=3)


def _stage(unfreeze_last: int | None) -> stages.TrainingStage:
    name = "head" if unfreeze_last is None else "fine-tune"
    return stages.TrainingStage(name=name, epochs=1, learning_rate=1e-3, epochs_before=0, rate_field="x",
                                unfreeze_last=unfreeze_last)


@pytest.mark.parametrize(
    ("base", "options", "unfreeze", "kind", "below", "trained"),
    [
        ("VGG16", {}, None, "features", "pool", ["head_dense_0", "predictions"]),
        ("VGG16", {}, 4, "prefix", "block4_pool", ["block5_conv1", "block5_conv2", "block5_conv3"]),
        # the last two layers of MobileNetV2 are a ReLU and a BatchNormalization: nothing in the
        # base trains, so the pooled features are what the stage can cache
        ("MobileNetV2", {"alpha": 0.35}, 2, "features", "pool", []),
    ],
)
def test_the_cut_is_below_the_first_trainable_layer_and_computes_the_same(
    base: str, options: dict[str, float], unfreeze: int | None, kind: str, below: str, trained: list[str],
    float32_policy: None,
) -> None:
    net = _network(base, **options)
    assert _stage(unfreeze).prepare(net) == trained
    cut = stages.frozen_cut(net)
    assert cut is not None and (cut.kind, cut.below) == (kind, below)
    x = np.random.default_rng(1).uniform(0, 255, (2, *SHAPE)).astype(np.float32)
    frozen_out = np.asarray(cut.frozen(x))
    assert frozen_out[0].size == cut.floats_per_image
    np.testing.assert_allclose(np.asarray(cut.rest(frozen_out)), np.asarray(net.model(x)), rtol=1e-5, atol=1e-6)
    assert not cut.frozen.trainable_weights
    assert sorted(w.path for w in cut.rest.trainable_weights) == sorted(w.path for w in net.model.trainable_weights)


def test_no_cut_when_every_layer_trains(float32_policy: None) -> None:
    net = _network()
    _stage(1000).prepare(net)
    assert stages.frozen_cut(net) is None


def _splits(n_train: int = 6, n_val: int = 4) -> data_lib.Splits:
    rng = np.random.default_rng(2)

    def images(n: int) -> data_lib.ImageSet:
        return data_lib.ImageSet(labels=(np.arange(n) % 3).astype(np.int32), size=SHAPE[:2],
                                 images=rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8))

    return data_lib.Splits(class_names=("a", "b", "c"), train=images(n_train), validation=images(n_val))


@pytest.mark.parametrize(
    ("augmented", "budget", "fast_path", "extracted"),
    [
        (False, 1 << 30, "prefix", 10),
        (True, 1 << 30, "validation-prefix", 4),
        (False, 4 * 2 * 2 * 512 * 4, "validation-prefix", 4),  # block4_pool is 2x2x512 at 32x32
        (False, 0, "none", 0),
    ],
)
def test_the_inputs_of_a_fine_tune_stage(
    augmented: bool, budget: int, fast_path: str, extracted: int, float32_policy: None
) -> None:
    net = _network()
    stage = _stage(4)
    stage.prepare(net)
    splits = _splits()
    augmentation = data_lib.build_augmentation(spec=AugmentationSpec(enabled=True), seed=1) if augmented else None
    inputs = stages.plan_inputs(stage=stage, network=net, splits=splits, augmentation=augmentation,
                                batch_size=4, seed=1, budget=budget)
    assert (inputs.fast_path, inputs.extracted) == (fast_path, extracted)
    x_val = np.asarray(splits.validation.images, dtype=np.float32)
    expected_val = np.asarray(net.model(x_val))
    if fast_path == "none":
        assert inputs.model is net.model and inputs.predictor is None and inputs.cached_below is None
        return
    assert inputs.cached_below == "block4_pool" and inputs.predictor is not None
    rest, cached = inputs.predictor
    np.testing.assert_allclose(np.asarray(rest(cached)), expected_val, rtol=1e-5, atol=1e-6)
    if fast_path == "prefix":  # the part above the cut trains on cached training inputs
        assert inputs.model is rest and inputs.train.shape == (6, 2, 2, 512)
        assert inputs.fit_kwargs["y"] is splits.train.labels
        assert isinstance(inputs.validation, tuple)
    else:  # the full model trains on images; validation runs on the cached inputs
        assert inputs.model is net.model
        assert isinstance(inputs.validation, features_lib.CachedValidation)
        assert inputs.validation.model is rest


@pytest.mark.parametrize("chunk", [1024, 7])
def test_cached_validation_reports_what_evaluate_reports(
    chunk: int, monkeypatch: pytest.MonkeyPatch, float32_policy: None
) -> None:
    keras.utils.set_random_seed(4)
    inputs = keras.Input((16,))
    hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(8, activation="relu")(inputs))
    head = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    head.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 16)).astype(np.float32), rng.integers(0, 3, 30).astype(np.int32)
    expected = head.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    monkeypatch.setattr(features_lib, "MAX_CHUNK", chunk)
    monkeypatch.setattr(features_lib, "MIN_CHUNK", min(chunk, features_lib.MIN_CHUNK))
    loss, accuracy = features_lib.cached_metrics(features_lib.CachedValidation(model=head, x=x, y=y, batch_size=4))
    assert loss == pytest.approx(expected["loss"], rel=1e-6)
    assert accuracy == pytest.approx(expected["accuracy"], abs=1e-7)
    assert 0.0 < accuracy < 1.0  # an untrained head: neither all right nor all wrong (a real comparison)


def test_extraction_called_directly_equals_predict(monkeypatch: pytest.MonkeyPatch, float32_policy: None) -> None:
    net = _network("MobileNetV2", alpha=0.35)
    images = _splits(n_train=20).train
    direct = features_lib.extract(model=net.features, images=images, batch_size=4)
    monkeypatch.setattr(features_lib, "MAX_CHUNK", 3)  # several chunks, the last one short
    monkeypatch.setattr(features_lib, "MIN_CHUNK", 1)
    chunked = features_lib.extract(model=net.features, images=images, batch_size=4)
    monkeypatch.setattr(features_lib, "EAGER_MAX_IMAGES", 0)  # the predict path
    predicted = features_lib.extract(model=net.features, images=images, batch_size=4)
    assert direct.shape == (20, 1280) and direct.dtype == np.float32  # MobileNetV2 pools 1280 channels
    np.testing.assert_allclose(chunked, predicted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(direct, predicted, rtol=1e-5, atol=1e-6)
