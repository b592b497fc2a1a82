"""Real evaluation data for the device_sim benchmarks and experiments (read from ../shared/data).

CIFAR-10 test JPEGs are decoded with Pillow (a bench/experiment-only dependency, installed with
matplotlib) into raw 0..255 float32 NCHW, the input of the MLPerf Tiny ResNet8.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST12 = DATA / "onnx_mnist12" / "mnist-12.onnx"
RESNET8 = DATA / "onnx_resnet8_cifar10" / "resnet8_cifar10.onnx"


def load_mnist_test(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test set as mnist-12 expects it: (N, 1, 28, 28) float32 in [0, 1], labels."""
    with np.load(DATA / "mnist" / "mnist.npz") as raw:
        x, y = raw["x_test"][:limit], raw["y_test"][:limit]
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


def load_cifar10_test(
    limit: int | None = None, per_class: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test JPEGs as (N, 3, 32, 32) float32 in 0..255 and labels (sorted-name order).

    With ``limit`` and ``per_class``, the first ``limit // 10`` images of each class are taken.
    """
    from PIL import Image  # noqa: PLC0415  # bench-only dependency

    with zipfile.ZipFile(DATA / "cifar10_jpeg" / "cifar10_test_jpg.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        if limit is not None and per_class:
            names = [n for n in names if int(Path(n).stem) < limit // len(classes)]
        elif limit is not None:
            names = names[:limit]
        x = np.empty((len(names), 3, 32, 32), np.float32)
        y = np.empty(len(names), np.int64)
        for i, name in enumerate(names):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                x[i] = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            y[i] = classes.index(name.split("/")[1])
    return x, y
