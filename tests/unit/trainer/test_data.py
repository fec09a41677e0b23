"""Class-per-folder scanning, decoding, splitting and the tf.data pipelines (no model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from finetune_contract.spec import AugmentationSpec, DataSpec
from finetune_trainer import data
from finetune_trainer.errors import DataError
from PIL import Image


def _spec(train: Path, validation: Path | None = None, split: float | None = None) -> DataSpec:
    if validation is not None:
        return DataSpec(train=str(train), validation=str(validation))
    return DataSpec(train=str(train), validation_split=split or 0.25)


def test_scan_sorts_classes_and_ignores_non_images(make_folder: Callable[..., Path]) -> None:
    root = make_folder(per_class=3, classes=("b_dogs", "a_cats"))
    (root / "a_cats" / "notes.txt").write_text("not an image")
    (root / "a_cats" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("top-level files are not classes")
    found = data.scan_folder(root=root, field_name="spec.data.train")
    assert found.class_names == ("a_cats", "b_dogs")
    assert len(found.files) == 6
    assert all(path.suffix == ".png" for path, _ in found.files)
    assert {label for path, label in found.files if path.parent.name == "b_dogs"} == {1}


def test_grayscale_palette_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L")
    rgba = Image.fromarray(np.full((10, 12, 4), 200, np.uint8), mode="RGBA")
    palette = Image.fromarray(np.full((10, 12, 3), 90, np.uint8)).convert("P")
    for name, img in (("g.png", gray), ("a.png", rgba), ("p.gif", palette)):
        img.save(tmp_path / name)
        out = data.read_image(tmp_path / name, size=(8, 6))
        assert out.shape == (8, 6, 3) and out.dtype == np.uint8, name
    assert np.all(data.read_image(tmp_path / "g.png", size=(10, 12)) == 77)


def test_split_is_seeded_and_stratified() -> None:
    files = [(Path(f"c{label}/{i}.png"), label) for label in range(3) for i in range(20)]
    train_a, val_a = data.split_files(files=files, fraction=0.25, seed=5)
    train_b, val_b = data.split_files(files=files, fraction=0.25, seed=5)
    _, val_c = data.split_files(files=files, fraction=0.25, seed=6)
    assert (train_a, val_a) == (train_b, val_b)
    assert val_a != val_c
    assert len(val_a) == 15 and len(train_a) == 45
    assert {label for _, label in val_a} == {0, 1, 2}
    assert not {p for p, _ in val_a} & {p for p, _ in train_a}


def test_load_with_validation_split_keeps_all_classes(image_sets: dict[str, Path]) -> None:
    splits = data.load_splits(data=_spec(image_sets["train"], split=0.25), image_size=(16, 16), seed=1)
    assert splits.class_names == ("circle", "square", "stripes")
    assert len(splits.train) + len(splits.validation) == 72
    assert splits.train.images is not None and splits.train.images.shape[1:] == (16, 16, 3)
    assert set(splits.validation.labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("missing_train", r"spec\.data\.train: folder .*nope does not exist"),
        ("no_class_folders", r"spec\.data\.train: .* has no class sub-folders"),
        ("empty_class", r"spec\.data\.train: class folder .*square has no images"),
        ("only_text_in_class", r"spec\.data\.train: class folder .*square has no images"),
        ("class_mismatch", r"spec\.data\.validation: class folders .* differ .*missing from validation: stripes"),
        ("one_class", r"spec\.data\.train: .* has only one class \(circle\)"),
        ("missing_validation", r"spec\.data\.validation: folder .* does not exist"),
    ],
)
def test_data_errors_name_the_problem(
    breakage: str, expected: str, make_folder: Callable[..., Path], tmp_path: Path
) -> None:
    train = make_folder("train", per_class=2)
    validation: Path | None = make_folder("val", per_class=2)
    if breakage == "missing_train":
        train = tmp_path / "nope"
    elif breakage == "no_class_folders":
        train = tmp_path / "flat"
        train.mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(train / "x.png")
    elif breakage in ("empty_class", "only_text_in_class"):
        for f in (train / "square").iterdir():
            f.unlink()
        if breakage == "only_text_in_class":
            (train / "square" / "labels.csv").write_text("a,b")
    elif breakage == "class_mismatch":
        assert validation is not None
        for f in (validation / "stripes").iterdir():
            f.unlink()
        (validation / "stripes").rmdir()
    elif breakage == "one_class":
        train = make_folder("single", per_class=3, classes=("circle",))
    elif breakage == "missing_validation":
        validation = tmp_path / "no-val"
    with pytest.raises(DataError, match=expected):
        data.load_splits(data=_spec(train, validation), image_size=(8, 8), seed=0)


def _break(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncate" else b"this is not a png")


def test_a_few_bad_files_are_skipped_and_counted(make_folder: Callable[..., Path]) -> None:
    train = make_folder("train", per_class=10)
    _break(train / "circle" / "000.png", "truncate")
    _break(train / "square" / "001.png", "garbage")
    splits = data.load_splits(data=_spec(train, split=0.2), image_size=(8, 8), seed=0)
    assert len(splits.skipped) == 2
    assert {Path(p).name for p, _ in splits.skipped} == {"000.png", "001.png"}
    assert len(splits.train) + len(splits.validation) == 28


def test_too_many_bad_files_fail(make_folder: Callable[..., Path]) -> None:
    train = make_folder("train", per_class=10)
    for i in range(data.bad_file_tolerance(30) + 1):
        _break(train / "stripes" / f"{i:03d}.png", "truncate")
    with pytest.raises(DataError, match=r"spec\.data: 6 of 30 image files are unreadable or truncated"):
        data.load_splits(data=_spec(train, split=0.2), image_size=(8, 8), seed=0)


def test_augmentation_touches_training_batches_only(image_sets: dict[str, Path]) -> None:
    splits = data.load_splits(data=_spec(image_sets["train"], image_sets["val"]), image_size=(32, 32), seed=0)
    assert data.build_augmentation(spec=AugmentationSpec(enabled=False), seed=0) is None
    assert data.build_augmentation(
        spec=AugmentationSpec(horizontal_flip=False, rotation=0, zoom=0, width_shift=0, height_shift=0), seed=0
    ) is None
    augment = data.build_augmentation(spec=AugmentationSpec(), seed=0)
    assert augment is not None
    val = data.make_dataset(images=splits.validation, batch_size=8, shuffle=False, seed=0)
    x_val = np.concatenate([np.asarray(x) for x, _ in val])
    assert splits.validation.images is not None
    np.testing.assert_array_equal(x_val, splits.validation.images.astype(np.float32))
    train = data.make_dataset(images=splits.train, batch_size=8, shuffle=False, seed=0, augmentation=augment)
    x_train = np.concatenate([np.asarray(x) for x, _ in train])
    assert splits.train.images is not None
    assert x_train.shape == splits.train.images.shape
    assert np.abs(x_train - splits.train.images.astype(np.float32)).mean() > 1.0


def test_streamed_pipeline_matches_in_memory(image_sets: dict[str, Path]) -> None:
    spec = _spec(image_sets["train"], image_sets["val"])
    memory = data.load_splits(data=spec, image_size=(20, 20), seed=0)
    streamed = data.load_splits(data=spec, image_size=(20, 20), seed=0, cache_bytes=0)
    assert memory.in_memory and not streamed.in_memory
    assert streamed.validation.images is None and len(streamed.validation.paths) == 24
    a = np.concatenate([np.asarray(x) for x, _ in data.make_dataset(images=memory.validation, batch_size=5, shuffle=False, seed=0)])
    b = np.concatenate([np.asarray(x) for x, _ in data.make_dataset(images=streamed.validation, batch_size=5, shuffle=False, seed=0)])
    np.testing.assert_array_equal(a, b)
    labels = np.concatenate([np.asarray(y) for _, y in data.make_dataset(images=streamed.train, batch_size=7, shuffle=True, seed=3)])
    assert sorted(labels.tolist()) == sorted(streamed.train.labels.tolist())


def _centroids(images: np.ndarray) -> np.ndarray:
    """[n, 2] (x, y) centre of mass of the first channel of each image."""
    mass = images[..., 0]
    yy, xx = np.mgrid[0 : mass.shape[1], 0 : mass.shape[2]]
    total = mass.sum(axis=(1, 2)) + 1e-9
    return np.stack([(mass * xx).sum(axis=(1, 2)) / total, (mass * yy).sum(axis=(1, 2)) / total], axis=1)


def test_fused_augmentation_moves_images_like_the_four_keras_layers() -> None:
    """Same distribution of transforms as RandomFlip, RandomRotation, RandomZoom, RandomTranslation in a row."""
    import keras
    import tensorflow as tf

    spec = AugmentationSpec()
    fused = data.build_augmentation(spec=spec, seed=0)
    assert fused is not None
    layers = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=1),
            keras.layers.RandomRotation(spec.rotation / 360.0, fill_mode="nearest", seed=2),
            keras.layers.RandomZoom(spec.zoom, fill_mode="nearest", seed=3),
            keras.layers.RandomTranslation(spec.height_shift, spec.width_shift, fill_mode="nearest", seed=4),
        ]
    )
    image = np.zeros((1, 32, 40, 3), np.float32)  # a small bright square off the centre, not square images
    image[0, 6:9, 8:11, :] = 255.0
    batch = np.repeat(image, 1024, axis=0)
    theirs = _centroids(np.asarray(layers(batch, training=True)))
    ours = _centroids(np.asarray(fused(tf.constant(batch), seed=tf.constant([5, 6], tf.int64))))
    flipped = (ours[:, 0] > 19.5).mean()  # the square starts left of the centre: right of it means flipped
    assert 0.4 < flipped < 0.6
    for points in (ours, theirs):  # the flip folded away: the distance from the vertical centre line
        points[:, 0] = np.abs(points[:, 0] - 19.5)
    for axis in (0, 1):
        assert abs(ours[:, axis].mean() - theirs[:, axis].mean()) < 1.0
        assert ours[:, axis].std() == pytest.approx(theirs[:, axis].std(), rel=0.1)
        for q in (5, 50, 95):
            assert abs(np.percentile(ours[:, axis], q) - np.percentile(theirs[:, axis], q)) < 1.5


def test_fused_augmentation_parts_are_exact() -> None:
    import tensorflow as tf

    image = np.random.default_rng(0).uniform(0, 255, (2, 12, 16, 3)).astype(np.float32)
    seed = tf.constant([1, 2], tf.int64)
    still = data.Augmentation(horizontal_flip=False, rotation=0.0, zoom=0.0, height_shift=0.0, width_shift=0.0)
    np.testing.assert_allclose(np.asarray(still(tf.constant(image), seed=seed)), image, atol=1e-3)
    flip = data.Augmentation(horizontal_flip=True, rotation=0.0, zoom=0.0, height_shift=0.0, width_shift=0.0)
    outs = [np.asarray(flip(tf.constant(image), seed=tf.constant([i, 0], tf.int64))) for i in range(20)]
    for out in outs:
        for k in range(2):
            assert np.allclose(out[k], image[k], atol=1e-3) or np.allclose(out[k], image[k, :, ::-1], atol=1e-3)
    assert any(np.allclose(o[0], image[0, :, ::-1], atol=1e-3) for o in outs)
    assert any(np.allclose(o[0], image[0], atol=1e-3) for o in outs)


def test_augmented_epochs_differ_and_repeat_with_the_seed(image_sets: dict[str, Path]) -> None:
    splits = data.load_splits(data=_spec(image_sets["train"], image_sets["val"]), image_size=(16, 16), seed=0)
    augment = data.build_augmentation(spec=AugmentationSpec(), seed=0)

    def epochs(seed: int) -> list[np.ndarray]:
        ds = data.make_dataset(images=splits.train, batch_size=8, shuffle=False, seed=seed, augmentation=augment)
        return [np.concatenate([np.asarray(x) for x, _ in ds]) for _ in range(2)]

    first, second = epochs(7)
    assert np.abs(first - second).mean() > 1.0
    again = epochs(7)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])


def test_cpu_limit_reads_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert data._cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert data._cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert data._cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert data._cgroup_quota(v1) is None
    monkeypatch.setattr(data, "_cgroup_quota", lambda: 0.5)
    assert data.cpu_limit() == 1
    monkeypatch.setattr(data, "_cgroup_quota", lambda: None)
    assert data.cpu_limit() == len(__import__("os").sched_getaffinity(0))
