"""Small hand-built ONNX graphs for the simulator's unit tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    x_shape: Sequence[int | str],
    y_name: str = "y",
    opset: int = 13,
    extra_outputs: Sequence[str] = (),
) -> onnx.ModelProto:
    """A one-input float model; outputs have unspecified shapes."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in (y_name, *extra_outputs)
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
