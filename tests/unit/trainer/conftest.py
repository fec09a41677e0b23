"""Fixtures of the trainer's unit tests: tiny generated image sets shared per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_testbed.imagesets import write_image_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shared read-only data sets: a train/val pair of three separable classes."""
    root = tmp_path_factory.mktemp("images")
    return {
        "train": write_image_folder(root / "train", per_class=24, seed=1),
        "val": write_image_folder(root / "val", per_class=8, seed=2),
    }


@pytest.fixture
def float32_policy() -> Iterator[None]:
    """Keras' global dtype policy is float32 during the test and after it."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """Writes a fresh image folder under tmp_path (for tests that break it)."""

    def make(name: str = "data", **kwargs: Any) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make
