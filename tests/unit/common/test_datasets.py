from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from common.datasets import (
    Dataset,
    filter_classes,
    load_dataset,
    parse_classes,
    parse_shard,
    shard,
    shard_fractions,
)
from common.errors import ConfigError, DataError

MNIST = Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist"
DIGITS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn digits per class
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # official t10k


def _row_hashes(x: np.ndarray) -> list[str]:
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return sorted(hashlib.sha1(row.tobytes()).hexdigest() for row in flat)


def _labelled_images(n: int, h: int = 6, w: int = 5, classes: int = 3) -> tuple[np.ndarray, ...]:
    """uint8 images whose first two pixels encode the sample index (so each is unique)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n) % 256
    x[:, 0, 1] = np.arange(n) // 256
    y = np.arange(n) % classes
    return x, y.astype(np.uint8)


def test_digits_shapes_split_and_class_counts() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 1, 8, 8)
    assert ds.x_test.shape == (450, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    assert counts.tolist() == DIGITS_COUNTS
    # stratified: each class has ~25% of its samples in test
    test_share = np.bincount(ds.y_test, minlength=10) / np.array(DIGITS_COUNTS)
    assert np.all(np.abs(test_share - 0.25) < 0.01)
    again = load_dataset("digits")
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_test, ds.y_test)


def test_npz_xy_is_split_exactly_once(tmp_path: Path) -> None:
    x, y = _labelled_images(40)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    ds = load_dataset(str(path))
    assert ds.x_train.shape == (30, 1, 6, 5) and ds.x_test.shape == (10, 1, 6, 5)
    both = np.concatenate([ds.x_train, ds.x_test])
    assert _row_hashes(np.round(both * 255).astype(np.uint8)) == _row_hashes(x[:, None])
    # labels stay attached to their images: the index pixel tells the original label
    index = np.round(ds.x_train[:, 0, 0, 0] * 255).astype(int) + 256 * np.round(
        ds.x_train[:, 0, 0, 1] * 255
    ).astype(int)
    assert np.array_equal(ds.y_train, y[index])
    assert ds.num_classes == 3


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz_mnist_layout(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.random((12, 3, 4, 4), dtype=np.float32)
    x_test = rng.random((5, 3, 4, 4), dtype=np.float32)
    if layout == "nhwc":
        stored_train, stored_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)
    elif layout == "nchw":
        stored_train, stored_test = x_train, x_test
    else:
        x_train, x_test = x_train[:, :1], x_test[:, :1]
        stored_train, stored_test = x_train[:, 0], x_test[:, 0]
    path = tmp_path / "m.npz"
    np.savez(
        path,
        x_train=stored_train,
        y_train=np.arange(12) % 4,
        x_test=stored_test,
        y_test=np.array([0, 1, 2, 3, 3]),
    )
    ds = load_dataset(str(path))
    assert np.array_equal(ds.x_train, x_train) and np.array_equal(ds.x_test, x_test)
    assert ds.num_classes == 4


def test_npz_missing_key_lists_keys_present(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 4, 4)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"bad.npz.*expected keys.*found \['images', 'y'\]"):
        load_dataset(str(path))


def test_npz_label_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 4, 4), dtype=np.uint8), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=r"4 images but 3 labels"):
        load_dataset(str(path))


def test_npz_float_pixels_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.full((4, 4, 4), -2.0), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"float pixels must be in \[0, 1\]"):
        load_dataset(str(path))


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'nope.npz' is neither a built-in name"):
        load_dataset("nope.npz")
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(DataError, match=r"data.csv.*unsupported file"):
        load_dataset(str(other))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX per the MNIST page: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, then data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_directory_with_train_and_test(tmp_path: Path) -> None:
    x, y = _labelled_images(20, h=7, w=7, classes=4)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:14])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y[:14])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x[14:])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y[14:])
    ds = load_dataset(str(tmp_path))
    assert np.array_equal(np.round(ds.x_train[:, 0] * 255).astype(np.uint8), x[:14])
    assert np.array_equal(ds.y_test, y[14:].astype(np.int64))
    assert ds.num_classes == 4


def test_idx_single_images_file_is_split(tmp_path: Path) -> None:
    x, y = _labelled_images(16, classes=2)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y)
    ds = load_dataset(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert len(ds.y_train) == 12 and len(ds.y_test) == 4


def test_idx_truncated_payload(tmp_path: Path) -> None:
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 5, 4, 4)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + bytes(5 * 16 - 3))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(5, 4, 4\) \(80 bytes.*payload has 77 bytes"):
        load_dataset(str(tmp_path))


def test_idx_bad_magic_and_missing_labels(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "x-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match=r"matching labels file .*x-labels-idx1-ubyte.gz"):
        load_dataset(str(tmp_path / "x-images-idx3-ubyte.gz"))
    _write_idx(tmp_path / "x-labels-idx1-ubyte.gz", np.zeros(1, dtype=np.uint8))
    with pytest.raises(DataError, match=r"not an IDX file.*got 12340803"):
        load_dataset(str(tmp_path / "x-images-idx3-ubyte.gz"))


def _write_folder(root: Path, classes: list[str], mode: str, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(2)
    channels = 3 if mode == "RGB" else 1
    pixels = []
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(4):
            shape = (size[1], size[0], 3) if channels == 3 else (size[1], size[0])
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(root / name / f"{k}.png")
            pixels.append(arr)
    return np.stack(pixels)


def test_image_folder_grey_with_train_test(tmp_path: Path) -> None:
    train = _write_folder(tmp_path / "train", ["0", "1", "2"], "L", (5, 6))
    test = _write_folder(tmp_path / "test", ["0", "1", "2"], "L", (5, 6))
    ds = load_dataset(str(tmp_path))
    assert ds.x_train.shape == (12, 1, 6, 5)
    assert np.allclose(ds.x_train[:, 0] * 255, train) and np.allclose(ds.x_test[:, 0] * 255, test)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.num_classes == 3


def test_image_folder_rgb_is_split(tmp_path: Path) -> None:
    pixels = _write_folder(tmp_path, ["cat", "dog"], "RGB", (4, 4))
    ds = load_dataset(str(tmp_path))
    assert ds.input_shape == (3, 4, 4)
    assert len(ds.y_train) == 6 and len(ds.y_test) == 2
    both = np.concatenate([ds.x_train, ds.x_test]).transpose(0, 2, 3, 1)
    assert _row_hashes(np.round(both * 255).astype(np.uint8)) == _row_hashes(pixels)


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    _write_folder(tmp_path, ["a"], "L", (4, 4))
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8), mode="L").save(tmp_path / "a" / "z.png")
    with pytest.raises(DataError, match=r"z.png'?: image is 5x5 but .* is 4x4"):
        load_dataset(str(tmp_path))


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"found no subfolders"):
        load_dataset(str(tmp_path))


def test_mnist_tiny_npz() -> None:
    ds = load_dataset(str(MNIST / "mnist_tiny.npz"))
    assert ds.x_train.shape == (1000, 1, 28, 28) and ds.x_test.shape == (500, 1, 28, 28)
    with np.load(MNIST / "mnist_tiny.npz") as raw:
        assert np.array_equal(np.bincount(ds.y_train), np.bincount(raw["y_train"]))
        assert np.array_equal(np.round(ds.x_test[:, 0] * 255).astype(np.uint8), raw["x_test"])
    assert ds.num_classes == 10


def test_mnist_idx_t10k_matches_npz_test_split() -> None:
    ds = load_dataset(str(MNIST / "idx"))  # only the t10k pair is complete there: it is split
    assert len(ds.y_train) + len(ds.y_test) == 10000
    assert ds.input_shape == (1, 28, 28)
    counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    assert counts.tolist() == MNIST_TEST_COUNTS
    both = np.round(np.concatenate([ds.x_train, ds.x_test])[:, 0] * 255).astype(np.uint8)
    with np.load(MNIST / "mnist.npz") as raw:
        reference = raw["x_test"]
    assert _row_hashes(both) == _row_hashes(reference)


def _id_dataset(labels: np.ndarray, test_labels: np.ndarray, classes: int) -> Dataset:
    """Dataset whose single pixel is the sample id, to track samples through shards."""
    return Dataset(
        name="ids",
        x_train=np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1),
        y_train=labels.astype(np.int64),
        x_test=np.arange(len(test_labels), dtype=np.float32).reshape(-1, 1, 1, 1),
        y_test=test_labels.astype(np.int64),
        num_classes=classes,
    )


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=0, max_size=120),
    count=st.integers(1, 5),
    skew=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_shards_partition_every_sample_exactly_once(
    labels: list[int], count: int, skew: float, seed: int
) -> None:
    y = np.asarray(labels, dtype=np.int64)
    ds = _id_dataset(y, y[::-1].copy(), 6)
    parts = [shard(ds, k, count, skew=skew, seed=seed) for k in range(count)]
    for split in ("train", "test"):
        ids = np.concatenate([getattr(p, f"x_{split}")[:, 0, 0, 0] for p in parts])
        assert sorted(ids.astype(int).tolist()) == list(range(len(y)))
        for p in parts:  # labels travel with their samples
            got_ids = getattr(p, f"x_{split}")[:, 0, 0, 0].astype(int)
            source = y if split == "train" else y[::-1]
            assert np.array_equal(getattr(p, f"y_{split}"), source[got_ids])
    for cls in range(6):  # each shard's share of each class is within one sample of the target
        n = int(np.sum(y == cls))
        for k, p in enumerate(parts):
            target = n * shard_fractions(cls, count, skew)[k]
            assert abs(int(np.sum(p.y_train == cls)) - target) < 1.0


def test_skew_changes_class_mix_and_zero_skew_is_iid() -> None:
    ds = load_dataset("digits")
    iid = [np.bincount(shard(ds, k, 3).y_train, minlength=10) for k in range(3)]
    assert np.all(np.ptp(np.stack(iid), axis=0) <= 1)  # stratified: counts differ by <= 1
    skewed = [np.bincount(shard(ds, k, 3, skew=0.5).y_train, minlength=10) for k in range(3)]
    for cls in range(10):
        home = cls % 3
        total = sum(c[cls] for c in skewed)
        assert skewed[home][cls] / total == pytest.approx(0.5 + 0.5 / 3, abs=0.01)
    assert shard(ds, 0, 3, skew=0.5).name == "digits[shard 0/3]"


def test_shard_is_deterministic_in_seed() -> None:
    ds = _id_dataset(np.arange(60) % 3, np.arange(9) % 3, 3)
    a = shard(ds, 1, 3, skew=0.3, seed=7)
    b = shard(ds, 1, 3, skew=0.3, seed=7)
    c = shard(ds, 1, 3, skew=0.3, seed=8)
    assert np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize(
    ("index", "count", "skew", "message"),
    [
        (3, 3, 0.0, r"shard index 3 out of range for 3 shards \(expected 0..2\)"),
        (-1, 3, 0.0, r"shard index -1 out of range"),
        (0, 0, 0.0, r"shard count must be >= 1, got 0"),
        (0, 3, 1.0, r"shard skew must be in \[0, 1\), got 1.0"),
    ],
)
def test_shard_bad_arguments(index: int, count: int, skew: float, message: str) -> None:
    ds = _id_dataset(np.arange(6) % 3, np.arange(3), 3)
    with pytest.raises(DataError, match=message):
        shard(ds, index, count, skew=skew)


def test_filter_classes_keeps_num_classes() -> None:
    ds = load_dataset("digits")
    kept = filter_classes(ds, [3, 1])
    assert set(kept.y_train.tolist()) == {1, 3} and set(kept.y_test.tolist()) == {1, 3}
    assert len(kept.y_train) + len(kept.y_test) == DIGITS_COUNTS[1] + DIGITS_COUNTS[3]
    assert kept.num_classes == 10
    with pytest.raises(DataError, match=r"classes \[10\] out of range; expected 0..9"):
        filter_classes(ds, [1, 10])


def test_dataset_validates_labels() -> None:
    with pytest.raises(DataError, match=r"y_train labels must be in 0..1, got range 0..2"):
        _id_dataset(np.array([0, 1, 2]), np.array([0]), 2)


def test_parse_shard() -> None:
    assert parse_shard("0/3") == (0, 3)
    assert parse_shard(" 2 / 3 ") == (2, 3)
    with pytest.raises(ConfigError, match=r"shard index 3 out of range for 3 shards"):
        parse_shard("3/3")
    with pytest.raises(
        ConfigError, match=r'shard must be "INDEX/COUNT" such as "0/3", got \'a/3\''
    ):
        parse_shard("a/3")
    with pytest.raises(ConfigError, match=r"shard count must be >= 1"):
        parse_shard("0/0")


def test_parse_classes() -> None:
    assert parse_classes("0,1, 2") == (0, 1, 2)
    with pytest.raises(ConfigError, match=r"non-negative integers, got \['x'\]"):
        parse_classes("0,x")
    with pytest.raises(ConfigError, match=r"must not repeat"):
        parse_classes("1,1")
    with pytest.raises(ConfigError, match=r"comma-separated"):
        parse_classes("1,,2")
