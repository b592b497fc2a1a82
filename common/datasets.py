"""Datasets for split learning: loaders, class filters and exact (optionally non-IID) shards.

Every loader returns a :class:`Dataset` whose images are float32 ``(N, C, H, W)`` in [0, 1] and
whose labels are int64 ``(N,)``. Supported specs (see :func:`load_dataset`):

- ``"digits"``: scikit-learn's 8x8 handwritten digits (ships with the package, no download);
- ``.npz`` files with ``x``, ``y`` or MNIST-style ``x_train``, ``y_train``, ``x_test``, ``y_test``;
- MNIST IDX files (``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]``), a directory of them
  or one images file;
- image folders, one subfolder per class (optionally under ``train/`` and ``test/``).

Whenever a source has no separate test split, a deterministic stratified split is made
(:data:`TEST_FRACTION`, seed :data:`SPLIT_SEED`).
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError
from common.types import AnyArray, FloatArray, IndexArray, LabelArray

logger = logging.getLogger(__name__)

TEST_FRACTION = 0.25
"""Share of samples held out for testing when a source has no test split."""

SPLIT_SEED = 0
"""Seed of the deterministic train/test split."""

BUILTIN_DATASETS = ("digits",)
"""Dataset names that need no file."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) read from image folders."""

_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
"""IDX type byte -> big-endian numpy dtype (from the IDX file format description)."""


@dataclass(frozen=True)
class Dataset:
    """Images and labels, already split into train and test.

    Raises:
        DataError: when arrays have the wrong dtype, rank or length, or labels fall outside
            ``0..num_classes-1``.
    """

    name: str
    """Human-readable name, e.g. ``"digits"`` or ``"mnist.npz[shard 0/3]"``."""
    x_train: FloatArray
    """Training images, float32 ``(N, C, H, W)`` in [0, 1]."""
    y_train: LabelArray
    """Training labels, int64 ``(N,)``."""
    x_test: FloatArray
    """Test images, float32 ``(M, C, H, W)`` in [0, 1]."""
    y_test: LabelArray
    """Test labels, int64 ``(M,)``."""
    num_classes: int
    """Number of classes of the full dataset (labels are ``0..num_classes-1``)."""

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if x.dtype != np.float32 or x.ndim != 4:
                raise DataError(
                    f"{self.name}: x_{split} must be float32 (N, C, H, W), "
                    f"got {x.dtype} with shape {x.shape}"
                )
            if y.dtype != np.int64 or y.ndim != 1:
                raise DataError(
                    f"{self.name}: y_{split} must be int64 (N,), got {y.dtype} with shape {y.shape}"
                )
            if len(x) != len(y):
                raise DataError(
                    f"{self.name}: x_{split} has {len(x)} samples but y_{split} has {len(y)} labels"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"{self.name}: y_{split} labels must be in 0..{self.num_classes - 1}, "
                    f"got range {y.min()}..{y.max()}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {self.x_train.shape[1:]} but test images are "
                f"{self.x_test.shape[1:]} (C, H, W)"
            )

    def subset(self, name: str, train: AnyArray, test: AnyArray) -> Dataset:
        """The samples selected by ``train``/``test`` (boolean masks or indices), same classes."""
        return Dataset(
            name=name,
            x_train=self.x_train[train],
            y_train=self.y_train[train],
            x_test=self.x_test[test],
            y_test=self.y_test[test],
            num_classes=self.num_classes,
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        _, c, h, w = self.x_train.shape
        return (c, h, w)


def check_dataset_spec(spec: str) -> None:
    """Raise DataError unless ``spec`` is a built-in name or an existing path (reads nothing)."""
    if spec not in BUILTIN_DATASETS and not Path(spec).exists():
        raise DataError(
            f"dataset {spec!r} is neither a built-in name {list(BUILTIN_DATASETS)} "
            "nor an existing file or directory"
        )


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by name (``"digits"``) or from a path.

    Args:
        spec: ``"digits"``, a ``.npz`` file, an IDX images file, a directory of IDX files or an
            image folder (one subfolder per class, optionally inside ``train/`` and ``test/``).

    Returns:
        The dataset, float32 images in [0, 1] and int64 labels.

    Raises:
        DataError: the path is missing, or its content is not one of the formats above; the
            message names the path and what was expected.
    """
    if spec in BUILTIN_DATASETS:
        return _load_digits()
    check_dataset_spec(spec)
    path = Path(spec)
    if path.is_dir():
        ds = _load_idx_dir(path) if _idx_images_in(path) else _load_image_folder(path)
    elif path.suffix == ".npz":
        ds = _load_npz(path)
    elif "idx3-ubyte" in path.name:
        ds = _load_idx_pair(path)
    else:
        raise DataError(
            f"{str(path)!r}: unsupported file; expected a .npz, an IDX images file "
            "(*-images-idx3-ubyte[.gz]) or a directory"
        )
    logger.info(
        "loaded %s: %d train + %d test images of shape %s, %d classes",
        ds.name,
        len(ds.y_train),
        len(ds.y_test),
        ds.input_shape,
        ds.num_classes,
    )
    return ds


def stored_scale(spec: str) -> float:
    """The value that 1.0 of the loaded images is in the samples as the dataset stores them.

    ``16`` for ``digits`` (pixels 0..16), ``255`` for 8-bit pixels (IDX files, image folders,
    integer ``.npz`` arrays and ``.npz`` floats above 1), ``1`` for ``.npz`` floats in [0, 1].
    A model exported for "samples as stored" divides its input by this.
    """
    if spec in BUILTIN_DATASETS:
        return 16.0
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                key = "x_train" if "x_train" in archive.files else "x"
                x = archive[key] if key in archive.files else None
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(path)!r}: cannot read as .npz: {exc}") from exc
        if x is not None and x.dtype.kind == "f" and (x.size == 0 or float(np.max(x)) <= 1.0):
            return 1.0
    return 255.0


def halve_train(ds: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """Two disjoint halves of the training split (a seeded permutation), each with the test split.

    E.g. the server's source data and the nodes' target data of a transfer study.
    """
    order = np.random.default_rng(seed).permutation(len(ds.y_train))
    half = len(order) // 2
    everything = np.arange(len(ds.y_test))
    return (
        ds.subset(f"{ds.name}[train half 0]", np.sort(order[:half]), everything),
        ds.subset(f"{ds.name}[train half 1]", np.sort(order[half:]), everything),
    )


def filter_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only the samples whose label is in ``classes`` (both splits).

    ``num_classes`` is unchanged so labels keep their meaning.

    Raises:
        DataError: ``classes`` is empty or names a class outside ``0..num_classes-1``.
    """
    if not classes:
        raise DataError(f"{ds.name}: class filter is empty; expected at least one class")
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if bad:
        raise DataError(f"{ds.name}: classes {bad} out of range; expected 0..{ds.num_classes - 1}")
    keep = np.asarray(sorted(set(classes)), dtype=np.int64)
    train = np.isin(ds.y_train, keep)
    test = np.isin(ds.y_test, keep)
    return ds.subset(f"{ds.name}[classes {','.join(str(c) for c in keep)}]", train, test)


def shard(ds: Dataset, index: int, count: int, *, skew: float = 0.0, seed: int = 0) -> Dataset:
    """Return shard ``index`` of an exact partition of both splits into ``count`` shards.

    Each class ``c`` has the home shard ``c % count``, which receives a fraction
    ``skew + (1 - skew) / count`` of the class's samples; the rest is spread evenly over the
    other shards. ``skew = 0`` is an IID stratified split; larger values give non-IID class
    mixes. Whatever the skew, every sample lands in exactly one shard. The assignment depends
    only on ``(labels, count, skew, seed)``, so separate processes calling this with different
    ``index`` values and the SAME ``seed`` get disjoint shards (different seeds give overlapping
    shards: derive per-node training seeds separately).

    Args:
        ds: The dataset to partition.
        index: Which shard to return, ``0..count-1``.
        count: Number of shards, >= 1.
        skew: Non-IID strength in [0, 1).
        seed: Seed of the per-class shuffle.

    Raises:
        DataError: ``count`` < 1, ``index`` out of range or ``skew`` outside [0, 1).
    """
    if count < 1:
        raise DataError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise DataError(
            f"shard index {index} out of range for {count} shards (expected 0..{count - 1})"
        )
    if not 0.0 <= skew < 1.0:
        raise DataError(f"shard skew must be in [0, 1), got {skew}")
    train = _shard_indices(ds.y_train, index, count, skew, np.random.default_rng([seed, 0]))
    test = _shard_indices(ds.y_test, index, count, skew, np.random.default_rng([seed, 1]))
    return ds.subset(f"{ds.name}[shard {index}/{count}]", train, test)


def shard_fractions(cls: int, count: int, skew: float) -> list[float]:
    """Fraction of class ``cls`` that each of ``count`` shards receives (sums to 1)."""
    base = (1.0 - skew) / count
    fractions = [base] * count
    fractions[cls % count] += skew
    return fractions


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"INDEX/COUNT"`` (e.g. ``"0/3"``) into ``(index, count)``.

    Raises:
        ConfigError: the text is not two integers with ``0 <= INDEX < COUNT``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ConfigError(f'shard must be "INDEX/COUNT" such as "0/3", got {text!r}')
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"shard count must be >= 1, got {text!r}")
    if index >= count:
        raise ConfigError(
            f"shard index {index} out of range for {count} shards (expected 0..{count - 1}), "
            f"got {text!r}"
        )
    return index, count


def parse_classes(text: str) -> tuple[int, ...]:
    """Parse a comma-separated class list such as ``"0,1,2"``.

    Raises:
        ConfigError: an item is not a non-negative integer, the list is empty or has duplicates.
    """
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f'classes must be comma-separated integers such as "0,1,2", got {text!r}')
    bad = [item for item in items if not item.isdigit()]
    if bad:
        raise ConfigError(f"classes must be non-negative integers, got {bad} in {text!r}")
    classes = tuple(int(item) for item in items)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes must not repeat, got {text!r}")
    return classes


def _shard_indices(
    y: LabelArray, index: int, count: int, skew: float, rng: np.random.Generator
) -> IndexArray:
    """Sorted positions of the samples of ``y`` that shard ``index`` receives."""
    chosen: list[IndexArray] = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        members = members[rng.permutation(len(members))]
        sizes = _largest_remainder(len(members), shard_fractions(int(cls), count, skew), int(cls))
        start = int(sum(sizes[:index]))
        chosen.append(members[start : start + sizes[index]])
    if not chosen:
        return np.zeros(0, dtype=np.intp)
    return np.sort(np.concatenate(chosen))


def _largest_remainder(total: int, fractions: list[float], rotate: int) -> list[int]:
    """Integer sizes summing to ``total``, as close as possible to ``total * fractions``.

    Ties in the remainders go first to shard ``rotate % len(fractions)`` and onwards, so that
    different classes hand their extra samples to different shards.
    """
    count = len(fractions)
    exact = [total * f for f in fractions]
    sizes = [int(np.floor(e)) for e in exact]
    order = sorted(range(count), key=lambda k: (-(exact[k] - sizes[k]), (k - rotate) % count))
    for k in order[: total - sum(sizes)]:
        sizes[k] += 1
    return sizes


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - sklearn is slow to import

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    return _split("digits", x, y)


def _split(name: str, x: FloatArray, y: LabelArray) -> Dataset:
    """Deterministic stratified train/test split of one labelled array."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_parts = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        members = members[rng.permutation(len(members))]
        test_parts.append(members[: round(len(members) * TEST_FRACTION)])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.intp)
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(
        name=name,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=_num_classes(y),
    )


def _num_classes(*labels: LabelArray) -> int:
    return max((int(y.max()) + 1 for y in labels if len(y)), default=1)


def _images(raw: AnyArray, where: str) -> FloatArray:
    """Validate and convert raw images to float32 ``(N, C, H, W)`` in [0, 1].

    Accepts ``(N, H, W)``, ``(N, C, H, W)``, ``(N, H, W, C)`` with C in {1, 3} (NCHW
    when both could be), and flat
    ``(N, S*S)`` square images; integer pixels in 0..255 are divided by 255; float pixels must
    be finite and in [0, 1] (or [0, 255], then divided by 255).
    """
    if raw.dtype.kind not in "uif":
        raise DataError(f"{where}: images must be numeric, got dtype {raw.dtype}")
    if raw.ndim == 2:
        side = round(float(np.sqrt(raw.shape[1])))
        if side * side != raw.shape[1]:
            raise DataError(
                f"{where}: flat images (N, F) need F to be a square number, got shape {raw.shape}"
            )
        raw = raw.reshape(len(raw), 1, side, side)
    elif raw.ndim == 3:
        raw = raw[:, None, :, :]
    elif raw.ndim == 4:
        channels_first = raw.shape[1] in (1, 3)
        channels_last = raw.shape[3] in (1, 3)
        if channels_last and not channels_first:
            raw = raw.transpose(0, 3, 1, 2)
        elif not channels_first:
            raise DataError(
                f"{where}: 4-D images must be NCHW or NHWC with 1 or 3 channels, "
                f"got shape {raw.shape}"
            )
    else:
        raise DataError(
            f"{where}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), "
            f"got shape {raw.shape}"
        )
    if raw.dtype.kind in "ui":
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DataError(
                f"{where}: integer pixels must be in 0..255, got range {raw.min()}..{raw.max()}"
            )
        return np.ascontiguousarray(raw, dtype=np.float32) / np.float32(255.0)
    x = np.ascontiguousarray(raw, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or Inf")
    if x.size and (x.min() < 0.0 or x.max() > 255.0):
        raise DataError(
            f"{where}: float pixels must be in [0, 1] (or [0, 255]), "
            f"got range [{x.min():g}, {x.max():g}]"
        )
    if x.size and x.max() > 1.0:
        logger.info("%s: float pixels exceed 1, dividing by 255", where)
        x = x / np.float32(255.0)
    return x


def _labels(raw: AnyArray, where: str, n: int) -> LabelArray:
    """Validate raw labels: 1-D, ``n`` of them, non-negative integers."""
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D (N,), got shape {raw.shape}")
    if len(raw) != n:
        raise DataError(f"{where}: {n} images but {len(raw)} labels")
    if raw.dtype.kind == "f":
        values = raw.astype(np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{where}: labels must be whole numbers, got non-integer values")
    elif raw.dtype.kind not in "ui":
        raise DataError(f"{where}: labels must be integers, got dtype {raw.dtype}")
    y = raw.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, got {y.min()}")
    return y


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r}: cannot read as .npz: {exc}") from exc
    split_keys = ("x_train", "y_train", "x_test", "y_test")
    if all(key in arrays for key in split_keys):
        x_train = _images(arrays["x_train"], f"{path}: x_train")
        x_test = _images(arrays["x_test"], f"{path}: x_test")
        y_train = _labels(arrays["y_train"], f"{path}: y_train", len(x_train))
        y_test = _labels(arrays["y_test"], f"{path}: y_test", len(x_test))
        return Dataset(
            name=path.name,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            num_classes=_num_classes(y_train, y_test),
        )
    if "x" in arrays and "y" in arrays:
        x = _images(arrays["x"], f"{path}: x")
        return _split(path.name, x, _labels(arrays["y"], f"{path}: y", len(x)))
    raise DataError(
        f"{str(path)!r}: expected keys 'x','y' or 'x_train','y_train','x_test','y_test'; "
        f"found {sorted(arrays)}"
    )


def read_idx(path: Path) -> AnyArray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Raises:
        DataError: bad magic number, unknown type byte, or a payload whose length does not
            match the header.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{str(path)!r}: cannot read IDX file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{str(path)!r}: not an IDX file (expected magic 0x0000TTDD with type byte in "
            f"{[hex(t) for t in _IDX_DTYPES]}), got {data[:4].hex()}"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{str(path)!r}: IDX header truncated ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{str(path)!r}: IDX header says shape {dims} ({expected} bytes of {dtype}) but the "
            f"payload has {len(data) - header} bytes"
        )
    array: AnyArray = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _labels_path_for(images: Path) -> Path:
    name = images.name.replace("images-idx3-ubyte", "labels-idx1-ubyte").replace(
        "images.idx3-ubyte", "labels.idx1-ubyte"
    )
    return images.with_name(name)


def _read_idx_pair(images: Path) -> tuple[FloatArray, LabelArray]:
    labels = _labels_path_for(images)
    if not labels.exists():
        raise DataError(f"{str(images)!r}: matching labels file {str(labels)!r} does not exist")
    x = _images(read_idx(images), str(images))
    return x, _labels(read_idx(labels), str(labels), len(x))


def _load_idx_pair(images: Path) -> Dataset:
    x, y = _read_idx_pair(images)
    return _split(images.name, x, y)


def _idx_images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and "idx3-ubyte" in p.name)


def _load_idx_dir(directory: Path) -> Dataset:
    """Use ``train-*`` and ``t10k-*``/``test-*`` pairs; split the one complete pair if alone."""
    complete = [p for p in _idx_images_in(directory) if _labels_path_for(p).exists()]
    if not complete:
        raise DataError(
            f"{str(directory)!r}: IDX images found but no matching *-labels-idx1-ubyte file"
        )
    train = [p for p in complete if p.name.startswith("train")]
    test = [p for p in complete if p.name.startswith(("t10k", "test"))]
    if len(train) == 1 and len(test) == 1:
        x_train, y_train = _read_idx_pair(train[0])
        x_test, y_test = _read_idx_pair(test[0])
        return Dataset(
            name=directory.name,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            num_classes=_num_classes(y_train, y_test),
        )
    if len(complete) == 1:
        logger.info("%s: only %s has images and labels; splitting it", directory, complete[0].name)
        return _load_idx_pair(complete[0])
    raise DataError(
        f"{str(directory)!r}: expected one train-* and one t10k-*/test-* IDX pair, "
        f"found {[p.name for p in complete]}"
    )


def _load_image_folder(directory: Path) -> Dataset:
    """One subfolder per class; ``train/`` + ``test/`` (or ``training/`` + ``testing/``) split."""
    subdirs = {p.name: p for p in directory.iterdir() if p.is_dir()}
    for train_name, test_name in (("train", "test"), ("training", "testing")):
        if set(subdirs) == {train_name, test_name}:
            classes = _class_names(subdirs[train_name])
            x_train, y_train = _read_class_folders(subdirs[train_name], classes)
            x_test, y_test = _read_class_folders(subdirs[test_name], classes)
            return Dataset(
                name=directory.name,
                x_train=x_train,
                y_train=y_train,
                x_test=x_test,
                y_test=y_test,
                num_classes=len(classes),
            )
    classes = _class_names(directory)
    x, y = _read_class_folders(directory, classes)
    ds = _split(directory.name, x, y)
    return Dataset(
        name=ds.name,
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_test=ds.x_test,
        y_test=ds.y_test,
        num_classes=len(classes),
    )


def _class_names(directory: Path) -> list[str]:
    names = [p.name for p in directory.iterdir() if p.is_dir()]
    if not names:
        raise DataError(
            f"{str(directory)!r}: expected an image folder (one subfolder per class), "
            "an IDX directory or a .npz file; found no subfolders"
        )
    if all(name.isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_class_folders(directory: Path, classes: list[str]) -> tuple[FloatArray, LabelArray]:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only image folders need it

    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if sorted(classes) != found:
        raise DataError(f"{str(directory)!r}: class subfolders {found} differ from {classes}")
    pixels: list[AnyArray] = []
    labels: list[int] = []
    files: list[Path] = []
    for label, name in enumerate(classes):
        for file in sorted((directory / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise DataError(f"{str(directory)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    images: list[Image.Image] = []
    try:
        for file in files:
            with Image.open(file) as opened:
                images.append(opened.copy())
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{str(file)!r}: cannot read image: {exc}") from exc
    gray = all(image.mode in ("L", "1", "I;16", "I") for image in images)
    size = images[0].size
    for file, image in zip(files, images, strict=True):
        if image.size != size:
            raise DataError(
                f"{str(file)!r}: image is {image.size[0]}x{image.size[1]} but "
                f"{str(files[0])!r} is {size[0]}x{size[1]}; all images must share one size"
            )
        pixels.append(np.asarray(image.convert("L" if gray else "RGB"), dtype=np.uint8))
    stacked = np.stack(pixels)
    x = _images(stacked if gray else stacked.transpose(0, 3, 1, 2), str(directory))
    return x, np.asarray(labels, dtype=np.int64)
