"""Loading the manifest the operator hands the trainer: JSON in a .yaml file, bounds on epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_contract import protocol
from finetune_contract.spec import MAX_STAGE_EPOCHS
from finetune_trainer import config


def _manifest(**training: object) -> dict[str, object]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {
            "model": {"base": "MobileNetV2", "weights": "none"},
            "data": {"train": "/data/train", "validationSplit": 0.2},
            "training": training,
            "output": {"path": "/models/x"},
            # A C1 control character: JSON carries it, YAML's reader refuses it.
            "runtime": {"env": [{"name": "NOTE", "value": "a\u0085b"}]},
        },
    }


def test_json_with_a_c1_character_loads_from_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(_manifest()), encoding="utf-8")
    spec = config.load_config(path=path)
    assert spec.model.base == "MobileNetV2"


def test_yaml_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "model: {base: VGG16, weights: none}\ndata: {train: /d, validationSplit: 0.2}\noutput: {path: /m}\n",
        encoding="utf-8",
    )
    assert config.load_config(path=path).model.base == "VGG16"


def test_epochs_are_bounded_within_the_progress_protocol() -> None:
    limit = MAX_STAGE_EPOCHS
    assert 2 * limit <= protocol.MAX_EPOCHS
    with pytest.raises(config.ConfigError, match="epochs"):
        config.parse_config(_manifest(head={"epochs": limit + 1}), source="test")
    spec = config.parse_config(_manifest(head={"epochs": limit}, fineTune={"epochs": limit}), source="test")
    assert spec.training.total_epochs == 2 * limit
