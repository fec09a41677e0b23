"""The outputs: model.keras and the inference SavedModel, and the hand-computed validation metrics."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from finetune_contract.spec import ModelSpec
from finetune_trainer import export, model


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_saved_model_serves_what_the_model_predicts(tmp_path: Path, policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    try:
        spec = ModelSpec(base="MobileNetV2", weights="none", input_shape=(32, 32, 3),
                         base_options={"alpha": 0.35}, head={"units": [8]})
        net = model.build_network(spec=spec, num_classes=3)
        images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
        expected = net.model.predict(images, verbose=0)
        path = export.write_model(model=net.model, out=tmp_path)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert path == tmp_path / "model.keras" and path.is_file()
    assert not (tmp_path / "model.tmp.keras").exists()
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    assert set(loaded.signatures) == {"serve", "serving_default"}  # what model.export() offers TF Serving
    for name in ("serve", "serving_default"):
        out = loaded.signatures[name](tf.constant(images))
        assert list(out) == ["output_0"]
        np.testing.assert_allclose(out["output_0"].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(loaded.serve(images[:2]).numpy(), expected[:2], atol=1e-6)  # any batch size
    # Each variable once: the SavedModel is about as large as model.keras (model.export() stored two copies).
    assert _size(tmp_path / "saved_model") < 1.5 * path.stat().st_size


def test_validation_metrics_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 1, 2])
    result = export.validation_metrics(probs=probs, labels=labels)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.4, 1.0])))
