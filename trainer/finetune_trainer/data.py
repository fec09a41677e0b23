"""Class-per-folder images to tf.data pipelines.

The layout is `flow_from_directory`'s: one sub-folder per class, class names in sorted
order. Every image is decoded once up front (Pillow, in threads): that pass finds unreadable
or truncated files (a few are skipped with a warning, more fail the run with a DataError),
converts grayscale, palette and RGBA images to RGB and resizes them to the model's input
size. When the decoded images fit in memory (the usual fine-tuning set) they stay there and
every epoch reads them from RAM; otherwise the pipeline decodes the surviving files again
each epoch. Augmentation is a stack of Keras preprocessing layers mapped over the training
batches only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.config import AugmentationSpec, DataSpec
from finetune_trainer.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassFolders",
    "ImageSet",
    "Splits",
    "bad_file_tolerance",
    "build_augmentation",
    "cache_budget",
    "load_splits",
    "make_dataset",
    "read_image",
    "scan_folder",
    "split_files",
]

log = logging.getLogger(__name__)

# What flow_from_directory / image_dataset_from_directory read; anything else is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"})

# Decoded images are kept in memory up to this many bytes (env FINETUNE_IMAGE_CACHE_BYTES).
DEFAULT_IMAGE_CACHE_BYTES = 2 * 1024**3
ENV_IMAGE_CACHE_BYTES = "FINETUNE_IMAGE_CACHE_BYTES"


@dataclass(frozen=True)
class ClassFolders:
    """The image files of one split root: (path, class index) pairs, classes in sorted order."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[tuple[Path, int], ...]


@dataclass
class ImageSet:
    """Images of one split, decoded in memory (`images`) or as paths decoded per epoch."""

    labels: np.ndarray  # int32, one per image
    size: tuple[int, int]  # (height, width) every image is resized to
    images: np.ndarray | None = None  # uint8 [n, height, width, 3] when in memory
    paths: tuple[str, ...] = ()  # when streamed

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Splits:
    """Training and validation images with their class names and what had to be skipped."""

    class_names: tuple[str, ...]
    train: ImageSet
    validation: ImageSet
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    in_memory: bool = True


def scan_folder(*, root: str | Path, field_name: str) -> ClassFolders:
    """Lists the class sub-folders of `root` and their image files; raises DataError naming the problem."""
    base = Path(root)
    if not base.exists():
        raise DataError(f"{field_name}: folder {base} does not exist")
    if not base.is_dir():
        raise DataError(f"{field_name}: {base} is not a folder")
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"{field_name}: cannot list {base}: {exc.strerror or exc}") from exc
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"{field_name}: {base} has no class sub-folders (expected one folder per class)")
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(class_dirs):
        images = _image_files(folder)
        if not images:
            raise DataError(f"{field_name}: class folder {folder} has no images")
        files.extend((path, index) for path in images)
    return ClassFolders(root=base, class_names=tuple(p.name for p in class_dirs), files=tuple(files))


def _image_files(folder: Path) -> list[Path]:
    """Image files under a class folder (recursively, like flow_from_directory), sorted; others ignored."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def split_files(
    *, files: Sequence[tuple[Path, int]], fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Seeded, stratified hold-out: about `fraction` of each class goes to validation (pure)."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    validation: list[tuple[Path, int]] = []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_val = round(len(items) * fraction) if len(items) > 1 else 0
        n_val = min(max(n_val, 1 if len(items) > 1 else 0), len(items) - 1)
        validation.extend(items[i] for i in order[:n_val])
        train.extend(items[i] for i in order[n_val:])
    return train, validation


def bad_file_tolerance(total: int) -> int:
    """How many unreadable files a run skips before failing: a few, or 1% of a large set."""
    return max(5, total // 100)


def read_image(path: str | Path, *, size: tuple[int, int]) -> np.ndarray:
    """Decodes one image to uint8 RGB of `size` (height, width); raises on unreadable or truncated files."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # full decode: a truncated file raises here
        if img.mode != "RGB":
            if img.mode in ("P", "PA") or "transparency" in img.info:
                rgb = img.convert("RGBA").convert("RGB")
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                rgb = Image.fromarray(np.clip(np.asarray(img) / 256, 0, 255).astype(np.uint8)).convert("RGB")
            else:
                rgb = img.convert("RGB")
        else:
            rgb = img
        height, width = size
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _try_read(path: Path, size: tuple[int, int], keep: bool) -> tuple[np.ndarray | None, str | None]:
    try:
        array = read_image(path, size=size)
    except Exception as exc:  # any decoder failure means the file is unreadable
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
    return (array if keep else None), None


def _decode_all(
    files: Sequence[tuple[Path, int]], *, size: tuple[int, int], keep: bool
) -> tuple[list[tuple[np.ndarray | None, int, Path]], list[tuple[str, str]]]:
    workers = max(1, min(16, (os.cpu_count() or 1) * 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        results = list(pool.map(lambda item: _try_read(item[0], size, keep), files))
    good: list[tuple[np.ndarray | None, int, Path]] = []
    bad: list[tuple[str, str]] = []
    for (path, label), (array, error) in zip(files, results, strict=True):
        if error is None:
            good.append((array, label, path))
        else:
            bad.append((str(path), error))
    return good, bad


def _image_set(
    good: Sequence[tuple[np.ndarray | None, int, Path]], *, keep: bool, size: tuple[int, int]
) -> ImageSet:
    labels = np.asarray([label for _, label, _ in good], dtype=np.int32)
    if keep:
        images = np.stack([a for a, _, _ in good if a is not None]) if good else np.zeros((0, *size, 3), np.uint8)
        return ImageSet(labels=labels, size=size, images=images)
    return ImageSet(labels=labels, size=size, paths=tuple(str(p) for _, _, p in good))


def load_splits(
    *, data: DataSpec, image_size: tuple[int, int], seed: int, cache_bytes: int | None = None
) -> Splits:
    """Scans, checks and decodes the training and validation images; raises DataError on bad data."""
    train_folders = scan_folder(root=data.train, field_name="spec.data.train")
    if len(train_folders.class_names) < 2:
        raise DataError(
            f"spec.data.train: {train_folders.root} has only one class ({train_folders.class_names[0]}); "
            "a classifier needs at least two"
        )
    if data.validation is not None:
        val_folders = scan_folder(root=data.validation, field_name="spec.data.validation")
        if val_folders.class_names != train_folders.class_names:
            missing = sorted(set(train_folders.class_names) - set(val_folders.class_names))
            extra = sorted(set(val_folders.class_names) - set(train_folders.class_names))
            parts = []
            if missing:
                parts.append(f"missing from validation: {', '.join(missing)}")
            if extra:
                parts.append(f"not in train: {', '.join(extra)}")
            raise DataError(
                f"spec.data.validation: class folders of {val_folders.root} differ from {train_folders.root} "
                f"({'; '.join(parts)})"
            )
        train_files, val_files = list(train_folders.files), list(val_folders.files)
    else:
        assert data.validation_split is not None
        train_files, val_files = split_files(files=train_folders.files, fraction=data.validation_split, seed=seed)
        if not val_files:
            raise DataError("spec.data.validationSplit: the split leaves no validation images; add images")

    total = len(train_files) + len(val_files)
    height, width = image_size
    limit = cache_bytes if cache_bytes is not None else cache_budget()
    keep = total * height * width * 3 <= limit
    good_train, bad_train = _decode_all(train_files, size=image_size, keep=keep)
    good_val, bad_val = _decode_all(val_files, size=image_size, keep=keep)
    bad = bad_train + bad_val
    if bad:
        tolerance = bad_file_tolerance(total)
        if len(bad) > tolerance:
            shown = ", ".join(p for p, _ in bad[:3])
            raise DataError(
                f"spec.data: {len(bad)} of {total} image files are unreadable or truncated "
                f"(more than the {tolerance} tolerated), e.g. {shown}: {bad[0][1]}"
            )
        for path, why in bad:
            log.warning("skipping unreadable image %s (%s)", path, why)
    names = train_folders.class_names
    for split, good, field_name in (
        ("train", good_train, "spec.data.train"),
        ("validation", good_val, "spec.data.validation" if data.validation else "spec.data.validationSplit"),
    ):
        present = {label for _, label, _ in good}
        empty = [names[i] for i in range(len(names)) if i not in present]
        if empty and (split == "train" or data.validation is not None):
            raise DataError(f"{field_name}: class folder {empty[0]} has no readable images in the {split} split")
    return Splits(
        class_names=names,
        train=_image_set(good_train, keep=keep, size=image_size),
        validation=_image_set(good_val, keep=keep, size=image_size),
        skipped=bad,
        in_memory=keep,
    )


def build_augmentation(*, spec: AugmentationSpec, seed: int) -> Any | None:
    """The seed's augmentation as Keras preprocessing layers (float32, on raw 0-255 batches), or None."""
    import keras

    if not spec.enabled:
        return None
    layers: list[Any] = []
    if spec.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, dtype="float32"))
    if spec.rotation > 0:
        layers.append(
            keras.layers.RandomRotation(spec.rotation / 360.0, fill_mode="nearest", seed=seed + 1, dtype="float32")
        )
    if spec.zoom > 0:
        layers.append(keras.layers.RandomZoom(spec.zoom, fill_mode="nearest", seed=seed + 2, dtype="float32"))
    if spec.width_shift > 0 or spec.height_shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                spec.height_shift, spec.width_shift, fill_mode="nearest", seed=seed + 3, dtype="float32"
            )
        )
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")


def _batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, shuffle: bool, seed: int) -> Callable[
    [], Iterator[tuple[np.ndarray, np.ndarray]]
]:
    """A generator factory yielding whole batches from memory, reshuffled (seeded) every epoch."""
    epoch = [0]

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(len(labels))
        if shuffle:
            order = np.random.default_rng(seed + epoch[0]).permutation(len(labels))
            epoch[0] += 1
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield images[index], labels[index]

    return generate


def make_dataset(
    *, images: ImageSet, batch_size: int, shuffle: bool, seed: int, augmentation: Any | None = None
) -> Any:
    """A batched tf.data pipeline of (float32 raw 0-255 images, int labels), augmented when given layers."""
    import tensorflow as tf

    n = len(images)
    steps = max(1, -(-n // batch_size))
    if images.images is not None:
        height, width = images.images.shape[1:3]
        spec = (
            tf.TensorSpec(shape=(None, height, width, 3), dtype=tf.uint8),
            tf.TensorSpec(shape=(None,), dtype=tf.int32),
        )
        ds = tf.data.Dataset.from_generator(
            _batches(images.images, images.labels, batch_size=batch_size, shuffle=shuffle, seed=seed),
            output_signature=spec,
        )
    else:
        ds = tf.data.Dataset.from_tensor_slices((list(images.paths), images.labels))
        if shuffle:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(_stream_decoder(images), num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmentation is not None:
        ds = ds.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _stream_decoder(images: ImageSet) -> Callable[[Any, Any], tuple[Any, Any]]:
    import tensorflow as tf

    size = images.size

    def decode(path: bytes) -> np.ndarray:
        try:
            return read_image(path.decode(), size=size)
        except Exception:  # checked up front; a file that broke since then is blanked, not fatal
            log.warning("image %s became unreadable; using a blank image", path.decode())
            return np.zeros((*size, 3), np.uint8)

    def fn(path: Any, label: Any) -> tuple[Any, Any]:
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape((*size, 3))
        return image, label

    return fn


def cache_budget() -> int:
    """Bytes the trainer may hold in memory for decoded images and cached activations."""
    try:
        return int(os.environ.get(ENV_IMAGE_CACHE_BYTES, DEFAULT_IMAGE_CACHE_BYTES))
    except ValueError:
        return DEFAULT_IMAGE_CACHE_BYTES
