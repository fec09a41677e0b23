"""Class-per-folder images to tf.data pipelines.

The layout is `flow_from_directory`'s: one sub-folder per class, class names in sorted
order. Every image is decoded once up front (Pillow, in threads): that pass finds unreadable
or truncated files (a few are skipped with a warning, more fail the run with a DataError),
converts grayscale, palette and RGBA images to RGB and resizes them to the model's input
size. When the decoded images fit in memory (the usual fine-tuning set) they stay there and
every epoch reads them from RAM; otherwise the pipeline decodes the surviving files again
each epoch. Augmentation is one random affine transform per image (flip, rotation, zoom and
shifts composed into a single matrix, applied by one ImageProjectiveTransformV3 per batch),
mapped over the training batches only: the distribution of Keras' RandomFlip, RandomRotation,
RandomZoom and RandomTranslation layers in a row, with one resampling instead of three.
Pipeline parallelism follows the CPUs the container may use (`cpu_limit`: the cgroup quota
and the affinity mask), not the host's core count.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from finetune_contract.spec import AugmentationSpec, DataSpec

from finetune_trainer.errors import DataError

__all__ = [
    "Augmentation",
    "ClassFolders",
    "ImageSet",
    "Splits",
    "bad_file_tolerance",
    "build_augmentation",
    "cache_budget",
    "cpu_limit",
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
    workers = max(1, min(16, cpu_limit() * 2))
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


@dataclass(frozen=True)
class Augmentation:
    """The seed's random augmentation as one affine transform per image.

    Per image, like the four Keras layers in a row (RandomFlip("horizontal"), RandomRotation,
    RandomZoom, RandomTranslation, fill "nearest", bilinear): a horizontal flip with
    probability 1/2, an angle uniform in +-rotation degrees, one zoom factor uniform in
    [1 - zoom, 1 + zoom] for both axes (above 1 zooms out), and shifts uniform in +-shift of
    the height and width. With c the image centre, p an output pixel and q its source pixel:
    q = z * F * R * (p - c - d) + c, the product of the layers' own output-to-input maps.
    """

    horizontal_flip: bool
    rotation: float  # degrees
    zoom: float
    height_shift: float
    width_shift: float

    def transforms(self, *, batch: Any, height: int, width: int, seed: Any) -> Any:
        """[batch, 8] projective transforms (output to input pixel), drawn from a stateless seed."""
        import tensorflow as tf

        seeds = tf.random.experimental.stateless_split(seed, num=5)

        def uniform(index: int, bound: float) -> Any:
            return tf.random.stateless_uniform((batch,), seeds[index], minval=-bound, maxval=bound)

        flip = (
            tf.where(tf.random.stateless_uniform((batch,), seeds[0]) > 0.5, -1.0, 1.0)
            if self.horizontal_flip
            else tf.ones((batch,))
        )
        angle = uniform(1, self.rotation * math.pi / 180.0)
        scale = 1.0 + uniform(2, self.zoom)
        dy = uniform(3, self.height_shift) * float(height)
        dx = uniform(4, self.width_shift) * float(width)
        cos, sin = tf.cos(angle), tf.sin(angle)
        a00, a01 = scale * flip * cos, -scale * flip * sin
        a10, a11 = scale * sin, scale * cos
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        ux, uy = -cx - dx, -cy - dy
        zeros = tf.zeros((batch,))
        return tf.stack(
            [a00, a01, a00 * ux + a01 * uy + cx, a10, a11, a10 * ux + a11 * uy + cy, zeros, zeros], axis=1
        )

    def __call__(self, images: Any, *, seed: Any) -> Any:
        """A batch of float images [n, h, w, c], each moved by its own random transform."""
        import tensorflow as tf

        shape = tf.shape(images)
        height, width = int(images.shape[1]), int(images.shape[2])
        matrices = self.transforms(batch=shape[0], height=height, width=width, seed=seed)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=matrices,
            output_shape=tf.constant([height, width], tf.int32),
            fill_value=tf.constant(0.0, images.dtype),
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )


def build_augmentation(*, spec: AugmentationSpec, seed: int) -> Augmentation | None:
    """The spec's augmentation as one fused random transform, or None when it moves nothing."""
    del seed  # the pipeline seeds each batch (make_dataset)
    if not spec.enabled:
        return None
    fused = Augmentation(
        horizontal_flip=spec.horizontal_flip,
        rotation=spec.rotation,
        zoom=spec.zoom,
        height_shift=spec.height_shift,
        width_shift=spec.width_shift,
    )
    if not (fused.horizontal_flip or fused.rotation > 0 or fused.zoom > 0 or fused.height_shift > 0 or fused.width_shift > 0):
        return None
    return fused


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
    *, images: ImageSet, batch_size: int, shuffle: bool, seed: int, augmentation: Augmentation | None = None
) -> Any:
    """A batched tf.data pipeline of (float32 raw 0-255 images, int labels), augmented when given one.

    Augmented batches draw their transforms from seeds that follow `seed` and change every epoch.
    """
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
    if augmentation is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (augmentation(tf.cast(xy[0], tf.float32), seed=s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    options = tf.data.Options()
    options.threading.private_threadpool_size = cpu_limit()
    options.autotune.cpu_budget = cpu_limit()
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


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


def cpu_limit() -> int:
    """CPUs this process may use: the cgroup's CPU quota (v2 cpu.max, v1 cfs quota) and affinity mask."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in CPUs, or None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
            period_us = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def cache_budget() -> int:
    """Bytes the trainer may hold in memory for decoded images and cached activations."""
    try:
        return int(os.environ.get(ENV_IMAGE_CACHE_BYTES, DEFAULT_IMAGE_CACHE_BYTES))
    except ValueError:
        return DEFAULT_IMAGE_CACHE_BYTES
