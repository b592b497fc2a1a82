"""Array type aliases shared across latentedge (numpy arrays with their dtype)."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float32]
"""float32 array: images (N, C, H, W) in [0, 1], latents (N, latent_dim), probabilities."""

LabelArray: TypeAlias = npt.NDArray[np.int64]
"""int64 array of class labels, shape (N,)."""

IndexArray: TypeAlias = npt.NDArray[np.intp]
"""Integer index array (positions into another array)."""

AnyArray: TypeAlias = npt.NDArray[np.generic]
"""An array of any dtype, as read from a file before validation."""
