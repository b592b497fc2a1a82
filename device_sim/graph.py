"""Read an ONNX graph, find its analog weights and rewrite it for simulation.

The analog tensors are the float initializers that reach the weight input of a Conv, Gemm or
MatMul, directly or through Reshape/Transpose/Identity/Cast/Squeeze/Unsqueeze/Flatten.
:func:`prepare` folds such chains (and, by default, a following BatchNormalization or per-channel
Mul) into one initializer per layer, in the layout the layer consumes, so noise models see the
weights as a crossbar would hold them. It also frees a batch dimension fixed to 1.
:func:`add_io_quantization` wraps analog layers with DAC/ADC ops and :func:`replicate` builds a
graph holding several copies, so one session evaluates several draws.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from common.errors import NoiseInjectionError
from device_sim.kernels import DOMAIN as KERNEL_DOMAIN
from device_sim.noise import AdcConfig, DacConfig

logger = logging.getLogger(__name__)

ANALOG_OPS = ("Conv", "Gemm", "MatMul")
"""Operators whose constant weight input is an analog tensor."""
PASS_THROUGH_OPS = frozenset(
    {"Reshape", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
)
"""Operators a weight may pass through on its way to an analog operator."""
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)
"""Operators of quantized graphs, which the simulator refuses."""
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
)
_TINY = 1e-20


@dataclass(frozen=True)
class AnalogTensor:
    """One analog weight tensor, as the prepared graph feeds it to its layer."""

    name: str
    """Name of the original initializer (what ``--analog-include`` matches)."""
    graph_name: str
    """Name of the initializer the layer reads in the prepared graph."""
    node: str
    """Name of the consuming Conv/Gemm/MatMul node."""
    op_type: str
    """Operator type of the consuming node."""
    weight_input: int
    """Which input of the node the weight is (0 or 1)."""
    channel_axis: int | None
    """Axis of the weight indexing output channels (crossbar rows); None for a vector."""
    folded: tuple[str, ...] = ()
    """Nodes folded into these weights (``BatchNormalization 'bn1'``, ``Mul 'scale'``)."""


@dataclass(frozen=True, eq=False)
class PreparedGraph:
    """A graph ready for simulation plus what was found and changed in it."""

    model: onnx.ModelProto
    """The rewritten model (clean weights)."""
    input_name: str
    """The one data input."""
    input_shape: tuple[int | str, ...]
    """Shape of the data input (symbolic dims as strings)."""
    input_dtype: np.dtype
    """Element type of the data input."""
    output_name: str
    """The output the prediction is read from (see :func:`select_output`)."""
    analog: tuple[AnalogTensor, ...]
    """The analog tensors, in graph order."""
    weights: dict[str, np.ndarray] = field(repr=False)
    """Clean weights by ``AnalogTensor.graph_name``."""
    batch_was_fixed: bool
    """True when the data input's batch dimension was 1 and was made symbolic."""
    outputs: tuple[OutputInfo, ...] = ()
    """Every output of the original model (for error messages)."""

    @property
    def folded_layers(self) -> tuple[str, ...]:
        """One line per fold, ``"BatchNormalization 'bn' -> Conv 'conv'"``."""
        return tuple(f"{f} -> {t.op_type} {t.node!r}" for t in self.analog for f in t.folded)


_INT_TYPES = frozenset(
    {
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
    }
)


def _elem_text(elem: int) -> str:
    """``float32``, ``int64``, ``string``: an ONNX element type as numpy names it."""
    if elem == onnx.TensorProto.STRING:
        return "string"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    except (KeyError, TypeError, ValueError):
        return str(onnx.TensorProto.DataType.Name(elem)).lower()


def _type_text(t: onnx.TypeProto) -> str:
    """``float32``, ``int64``, ``seq(map(int64,float32))``: an ONNX type as short text."""
    which = t.WhichOneof("value")
    if which == "tensor_type":
        elem = t.tensor_type.elem_type
        if elem == onnx.TensorProto.UNDEFINED:
            return "tensor"
        return _elem_text(elem)
    if which == "sequence_type":
        return f"seq({_type_text(t.sequence_type.elem_type)})"
    if which == "map_type":
        key = _elem_text(t.map_type.key_type)
        return f"map({key},{_type_text(t.map_type.value_type)})"
    if which == "optional_type":
        return f"optional({_type_text(t.optional_type.elem_type)})"
    return which or "unknown type"


@dataclass(frozen=True)
class OutputInfo:
    """What a model output holds, from its declared or inferred type."""

    name: str
    type_text: str
    """``float32``, ``int64``, ``seq(map(int64,float32))``..."""
    is_tensor: bool
    elem_type: int
    """ONNX element type of a tensor (``TensorProto.UNDEFINED`` otherwise)."""
    shape: tuple[int | str, ...] | None
    """Tensor shape (symbolic dims as strings, unknown as ``?``); None when the rank is unknown."""

    @property
    def is_float(self) -> bool:
        """A float tensor."""
        return self.is_tensor and self.elem_type in _FLOAT_TYPES

    @property
    def is_int(self) -> bool:
        """An integer tensor."""
        return self.is_tensor and self.elem_type in _INT_TYPES

    def could_be_labels(self) -> bool:
        """An integer tensor of shape (N,) or (N, 1), or of unknown rank."""
        return self.is_int and (
            self.shape is None
            or len(self.shape) == 1
            or (len(self.shape) == 2 and self.shape[1] == 1)
        )

    def could_be_scores(self) -> bool:
        """A float tensor (N, C) with C not fixed to 1 (or of unknown rank)."""
        if not self.is_float:
            return False
        if self.shape is None:
            return True
        return len(self.shape) >= 2 and any(d != 1 for d in self.shape[1:])

    def describe(self) -> str:
        """``'label' int64 (N,)``: name, type and shape for messages."""
        if not self.is_tensor:
            return f"{self.name!r} {self.type_text}"
        shape = "(rank unknown)" if self.shape is None else _dims_text(self.shape)
        return f"{self.name!r} {self.type_text} {shape}"


def _dims_text(shape: tuple[int | str, ...]) -> str:
    dims = ["N" if i == 0 else str(d) for i, d in enumerate(shape)]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def describe_outputs(model: onnx.ModelProto) -> tuple[OutputInfo, ...]:
    """The outputs of ``model`` with their types, shapes filled in by ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.output
    except Exception as exc:  # inference is best effort: unknown domains, bad graphs
        logger.debug("shape inference failed: %s", exc)
        inferred = model.graph.output
    by_name = {o.name: o for o in inferred}
    infos = []
    for declared in model.graph.output:
        value = declared
        guess = by_name.get(declared.name)
        if guess is not None and guess.type.WhichOneof("value") is not None:
            value = guess
        t = value.type
        is_tensor = t.WhichOneof("value") == "tensor_type"
        shape: tuple[int | str, ...] | None = None
        if is_tensor and t.tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.tensor_type.shape.dim
            )
        infos.append(
            OutputInfo(
                name=declared.name,
                type_text=_type_text(t),
                is_tensor=is_tensor,
                elem_type=t.tensor_type.elem_type if is_tensor else onnx.TensorProto.UNDEFINED,
                shape=shape,
            )
        )
    return tuple(infos)


_OUTPUT_HINT = (
    "the prediction is read from one tensor of class scores or probabilities (N, C) or class "
    "ids (N,); choose it with --output NAME"
)


def _outputs_text(outputs: Iterable[OutputInfo]) -> str:
    return "; ".join(o.describe() for o in outputs)


def select_output(outputs: tuple[OutputInfo, ...], requested: str | None) -> str:
    """The output the prediction is read from.

    ``requested`` must name a tensor output. Otherwise: the only output; else the one integer
    (N,) class-id output; else the one float (N, C) score output; else refuse. Sequence/map
    outputs (scikit-learn's ZipMap) are never chosen. The shape of the chosen output is checked
    again on the values it takes (:func:`device_sim.runner.predicted_classes`).

    Raises:
        NoiseInjectionError: unknown or non-tensor ``requested``, or no unambiguous choice.
    """
    listing = _outputs_text(outputs)
    if requested is not None:
        chosen = next((o for o in outputs if o.name == requested), None)
        if chosen is None:
            raise NoiseInjectionError(
                f"--output {requested!r} is not a model output; outputs: {listing}"
            )
        if not chosen.is_tensor:
            raise NoiseInjectionError(
                f"--output {requested!r} is a {chosen.type_text}, not a tensor: {_OUTPUT_HINT} "
                f"(outputs: {listing})"
            )
        return chosen.name
    tensors = [o for o in outputs if o.is_tensor]
    if len(outputs) == 1 and tensors:
        return tensors[0].name
    labels = [o for o in tensors if o.could_be_labels()]
    if len(labels) == 1:
        return labels[0].name
    scores = [o for o in tensors if o.could_be_scores()]
    if len(scores) == 1:
        return scores[0].name
    raise NoiseInjectionError(
        f"cannot tell which of the {len(outputs)} model output(s) is the prediction: {listing}; "
        f"{_OUTPUT_HINT}"
    )


@dataclass(frozen=True)
class NoiseInput:
    """A graph input that receives ADC output noise."""

    name: str
    """Graph input name."""
    layer_output: str
    """Name of the layer output in the clean graph whose per-sample shape the noise has."""
    scale: float
    """Std of the values to feed (output noise std in ADC steps)."""
    stream: tuple[int, ...]
    """Key of the stream after ``(seed, draw, 1)`` that places its window in the run's noise bank
    (``runner.adc_noise_offset``): ``(j,)`` for layer ``j``'s ADC (pass 0
    of ``bm=iterative``), ``(j, k)`` for pass k ≥ 1 of ``bm=iterative``."""
    fused: bool = False
    """Read by a fused ``AdcOutput`` node: fed the whole bank, and the bank index of the batch's
    first value as the int64 input :func:`noise_start_name` (instead of the window itself)."""


def noise_start_name(noise_name: str) -> str:
    """The int64 input that places a fused noise input's batch in the bank."""
    return f"{noise_name}/start"


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (with external data beside it).

    Raises:
        NoiseInjectionError: the file is missing or not an ONNX model.
    """
    p = Path(path)
    if not p.is_file():
        raise NoiseInjectionError(f"model file {str(p)!r} does not exist")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise NoiseInjectionError(
            f"model file {str(p)!r} is not a readable ONNX model: {exc}"
        ) from exc


def _check_not_quantized(graph: onnx.GraphProto) -> None:
    counts = Counter(n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS)
    if counts:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
        raise NoiseInjectionError(
            f"quantized graph ({ops}): its int8 weights and requantisation are not simulated; "
            "the simulator perturbs float Conv/Gemm/MatMul weights only, so give it the float model"
        )


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Turn ``Constant`` nodes holding a tensor into initializers (weights may sit behind them)."""
    keep = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _name_nodes(graph: onnx.GraphProto) -> None:
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _constant_values(graph: onnx.GraphProto, inits: set[str]) -> set[str]:
    """Names computable from initializers alone."""
    const = set(inits)
    for node in graph.node:
        if all((not i) or i in const for i in node.input) and not any(
            a.type == onnx.AttributeProto.GRAPH for a in node.attribute
        ):
            const.update(node.output)
    return const


def _unfix_batch(
    graph: onnx.GraphProto, data_input: onnx.ValueInfoProto, inits: dict[str, onnx.TensorProto]
) -> bool:
    """Make a batch dimension fixed to 1 symbolic; return True when it was fixed."""
    dims = data_input.type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
        return False
    dims[0].dim_param = "N"
    for out in graph.output:
        out_dims = out.type.tensor_type.shape.dim
        if out_dims and out_dims[0].HasField("dim_value") and out_dims[0].dim_value == 1:
            out_dims[0].dim_param = "N"
    del graph.value_info[:]
    const = _constant_values(graph, set(inits))
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] in const or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]]).copy()
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        if shape.size == 0 or shape[0] != 1 or allowzero:
            continue
        shape[0] = 0  # copy the batch dimension from the data
        name = f"{node.input[1]}/batch"
        tensor = numpy_helper.from_array(shape, name)
        graph.initializer.append(tensor)
        inits[name] = tensor
        node.input[1] = name
    return True


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == onnx.AttributeProto.FLOAT else a.i
    return default


def _channel_axis(node: onnx.NodeProto, index: int, ndim: int) -> int | None:
    """Axis of the effective weight that indexes the layer's outputs."""
    if ndim < 2:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        if index == 1:
            return 0 if _attr(node, "transB", 0) else 1
        return 1 if _attr(node, "transA", 0) else 0
    return ndim - 1 if index == 1 else ndim - 2


def _trace(
    name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> tuple[str, list[onnx.NodeProto]] | None:
    """Follow ``name`` back through pass-through ops to a float initializer."""
    chain: list[onnx.NodeProto] = []
    while name not in inits:
        node = producers.get(name)
        if (
            node is None
            or node.op_type not in PASS_THROUGH_OPS
            or node.domain not in ("", "ai.onnx")
        ):
            return None
        if any(i and i not in inits for i in node.input[1:]):
            return None
        chain.append(node)
        name = node.input[0]
    if inits[name].data_type not in _FLOAT_TYPES:
        return None
    return name, chain[::-1]


def _evaluate_chain(
    model: onnx.ModelProto,
    source: str,
    chain: list[onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
) -> np.ndarray:
    """The value of the chain's last output, computed by the ONNX reference evaluator."""
    if not chain:
        return numpy_helper.to_array(inits[source])
    needed = {source} | {i for n in chain for i in n.input[1:] if i}
    out = chain[-1].output[0]
    graph = helper.make_graph(
        list(chain),
        "chain",
        [],
        [helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None)],
        [inits[n] for n in sorted(needed)],
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    (value,) = ReferenceEvaluator(sub).run(None, {})
    return np.asarray(value)


def _per_channel(
    values: np.ndarray, out_axis: int, channels: int, out_rank: int
) -> np.ndarray | None:
    """``values`` as a length-``channels`` vector if it broadcasts along ``out_axis`` only."""
    if values.ndim > out_rank:
        return None
    padded = values.reshape((1,) * (out_rank - values.ndim) + values.shape)
    axis = out_axis % out_rank
    if any(s != 1 for i, s in enumerate(padded.shape) if i != axis):
        return None
    vector = padded.reshape(-1)
    if vector.size == 1:
        return np.full(channels, vector[0], dtype=np.float64)
    return vector.astype(np.float64) if vector.size == channels else None


@dataclass
class _Layer:
    node: onnx.NodeProto
    index: int
    source: str
    chain: list[onnx.NodeProto]
    weight: np.ndarray
    axis: int | None
    folded: list[str] = field(default_factory=list)


class _Rewriter:
    """Mutable state while one graph is prepared."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.graph.node for o in n.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in set(node.input):
                out.setdefault(name, []).append(node)
        return out

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        unique = name
        while unique in self.inits or unique in {o for n in self.graph.node for o in n.output}:
            unique += "'"
        tensor = numpy_helper.from_array(array, unique)
        self.graph.initializer.append(tensor)
        self.inits[unique] = tensor
        return unique

    def find_layers(self, include: str | None, exclude: str | None) -> list[_Layer]:
        producers = self.producers()
        layers: list[_Layer] = []
        skipped: list[str] = []
        for node in self.graph.node:
            if node.op_type not in ANALOG_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Conv":
                index = 1
            else:
                sides = [_trace(node.input[i], producers, self.inits) is not None for i in (0, 1)]
                if sides[0] == sides[1]:
                    continue  # no constant side, or both: nothing analog happens at run time
                index = 1 if sides[1] else 0
            found = (
                _trace(node.input[index], producers, self.inits) if len(node.input) > 1 else None
            )
            if found is None:
                continue
            source, chain = found
            if (include and not re.search(include, source)) or (
                exclude and re.search(exclude, source)
            ):
                skipped.append(source)
                continue
            weight = _evaluate_chain(self.model, source, chain, self.inits)
            axis = _channel_axis(node, index, weight.ndim)
            layers.append(_Layer(node, index, source, chain, weight, axis))
        if not layers:
            if skipped:
                raise NoiseInjectionError(
                    f"no analog layers selected: none of the analog initializers {sorted(skipped)} "
                    f"matches --analog-include {include!r} without matching "
                    f"--analog-exclude {exclude!r}"
                )
            raise NoiseInjectionError(
                "model has no analog layers: no Conv/Gemm/MatMul takes a float initializer as "
                f"weight (directly or through {'/'.join(sorted(PASS_THROUGH_OPS))})"
            )
        return layers

    def _bias_index(self, layer: _Layer) -> int | None:
        op = layer.node.op_type
        if op == "Conv":
            return 2
        plain_gemm = (
            op == "Gemm"
            and layer.index == 1
            and not _attr(layer.node, "transA", 0)
            and _attr(layer.node, "alpha", 1.0) == 1.0
            and _attr(layer.node, "beta", 1.0) == 1.0
        )
        return 2 if plain_gemm else None

    def fold_next(self, layer: _Layer, graph_outputs: set[str]) -> bool:
        """Fold a BatchNormalization or per-channel Mul that follows ``layer``; True if folded."""
        node, out = layer.node, layer.node.output[0]
        users = self.consumers().get(out, [])
        if layer.axis is None or out in graph_outputs or len(users) != 1:
            return False
        nxt = users[0]
        channels = layer.weight.shape[layer.axis]
        bias_index = self._bias_index(layer)
        if (
            nxt.op_type == "BatchNormalization"
            and bias_index is not None
            and nxt.input[0] == out
            and all(i in self.inits for i in nxt.input[1:5])
            and len([o for o in nxt.output if o]) == 1
            and not _attr(nxt, "training_mode", 0)
        ):
            scale, beta, mean, var = (
                numpy_helper.to_array(self.inits[i]).astype(np.float64) for i in nxt.input[1:5]
            )
            eps = float(_attr(nxt, "epsilon", 1e-5))
            s = scale / np.sqrt(var + eps)
            shift = beta - mean * s
        elif nxt.op_type == "Mul":
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            if other not in self.inits:
                return False
            values = numpy_helper.to_array(self.inits[other])
            if node.op_type == "MatMul":
                out_axis, rank = (-1 if layer.index == 1 else -2), max(2, values.ndim)
            else:
                out_axis, rank = (1 if layer.index == 1 else 0), layer.weight.ndim
            vector = _per_channel(values, out_axis, channels, rank)
            if vector is None:
                return False
            s, shift = vector, np.zeros(channels)
        else:
            return False
        new_bias: np.ndarray | None = None
        if bias_index is not None:
            if len(node.input) > bias_index and node.input[bias_index]:
                old = numpy_helper.to_array(self.inits[node.input[bias_index]])
                if old.size not in (1, channels):
                    return False
                bias = np.broadcast_to(old.reshape(-1), (channels,)).astype(np.float64)
            else:
                bias = np.zeros(channels)
            new_bias = (bias * s + shift).astype(layer.weight.dtype)
        elif np.any(shift != 0):
            return False
        shape = [1] * layer.weight.ndim
        shape[layer.axis] = channels
        layer.weight = (layer.weight.astype(np.float64) * s.reshape(shape)).astype(
            layer.weight.dtype
        )
        if bias_index is not None and new_bias is not None:
            while len(node.input) <= bias_index:
                node.input.append("")
            node.input[bias_index] = self.add_initializer(new_bias, f"{node.name}/folded_bias")
        node.output[0] = nxt.output[0]
        self.graph.node.remove(nxt)
        layer.folded.append(f"{nxt.op_type} {nxt.name!r}")
        return True

    def prune(self, keep_outputs: Iterable[str]) -> None:
        """Drop nodes and initializers no longer reachable from the graph outputs."""
        needed = set(keep_outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(self.graph.node):
            if any(o in needed for o in node.output) or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                kept.append(node)
                needed.update(node.input)
                needed.update(_subgraph_inputs(node))
        del self.graph.node[:]
        self.graph.node.extend(reversed(kept))
        live = [t for t in self.graph.initializer if t.name in needed]
        del self.graph.initializer[:]
        self.graph.initializer.extend(live)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


def prepare(
    model: onnx.ModelProto,
    *,
    output: str | None = None,
    fold_affine: bool = True,
    analog_include: str | None = None,
    analog_exclude: str | None = None,
) -> PreparedGraph:
    """Find the analog tensors of ``model`` and rewrite it for simulation.

    Args:
        model: the model; it is not modified.
        output: graph output the prediction is read from; default: :func:`select_output`.
        fold_affine: fold a BatchNormalization or per-channel Mul that follows an analog layer
            into its weights (the analog array stores the folded weights).
        analog_include: only initializers whose name matches this regex (``re.search``) are analog.
        analog_exclude: initializers whose name matches this regex are not analog.

    Returns:
        The prepared graph; with no noise it computes what ``model`` computes.

    Raises:
        NoiseInjectionError: quantized graph, no analog layers, several data inputs, unknown output
            or invalid regex.
    """
    for flag, pattern in (
        ("--analog-include", analog_include),
        ("--analog-exclude", analog_exclude),
    ):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise NoiseInjectionError(
                    f"{flag} {pattern!r} is not a valid regex: {exc}"
                ) from exc
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    _check_not_quantized(graph)
    _constants_to_initializers(graph)
    _name_nodes(graph)
    init_names = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in init_names]
    if len(data_inputs) != 1:
        raise NoiseInjectionError(
            f"model must have exactly one data input, found {len(data_inputs)}: "
            f"{[i.name for i in data_inputs]}"
        )
    kept_inputs = list(data_inputs)
    del graph.input[:]
    graph.input.extend(kept_inputs)  # initializers listed as inputs (IR < 4) become constants
    output_infos = describe_outputs(work)
    output_name = select_output(output_infos, output)
    selected = [o for o in graph.output if o.name == output_name]
    del graph.output[:]
    graph.output.extend(selected)
    rewriter = _Rewriter(work)
    batch_was_fixed = _unfix_batch(graph, graph.input[0], rewriter.inits)
    layers = rewriter.find_layers(analog_include, analog_exclude)
    if fold_affine:
        for layer in layers:
            while rewriter.fold_next(layer, {output_name}):
                pass
    # a weight also read inside an If/Loop body is copied, so the analog one can change freely
    uses = Counter(i for n in graph.node for i in (*n.input, *_subgraph_inputs(n)))
    analog: list[AnalogTensor] = []
    weights: dict[str, np.ndarray] = {}
    for layer in layers:
        direct = not layer.chain and not layer.folded and uses[layer.source] == 1
        graph_name = (
            layer.source
            if direct
            else rewriter.add_initializer(layer.weight, f"{layer.source}::analog")
        )
        layer.node.input[layer.index] = graph_name
        weights[graph_name] = layer.weight
        analog.append(
            AnalogTensor(
                name=layer.source,
                graph_name=graph_name,
                node=layer.node.name,
                op_type=layer.node.op_type,
                weight_input=layer.index,
                channel_axis=layer.axis,
                folded=tuple(layer.folded),
            )
        )
    rewriter.prune([output_name])
    data = graph.input[0]
    shape = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in data.type.tensor_type.shape.dim
    )
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data.type.tensor_type.elem_type))
    logger.info(
        "analog tensors: %d (%s)%s%s",
        len(analog),
        ", ".join(t.name for t in analog[:6]) + (", ..." if len(analog) > 6 else ""),
        "; batch dimension un-fixed" if batch_was_fixed else "",
        f"; folded {sum(len(t.folded) for t in analog)} affine nodes"
        if any(t.folded for t in analog)
        else "",
    )
    return PreparedGraph(
        model=work,
        input_name=data.name,
        input_shape=shape,
        input_dtype=dtype,
        output_name=output_name,
        analog=tuple(analog),
        weights=weights,
        batch_was_fixed=batch_was_fixed,
        outputs=output_infos,
    )


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``names`` (types left for the runtime to infer)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def adc_scale_name(node_name: str) -> str:
    """Name of the scalar initializer that scales a layer's output after its ADC."""
    return f"{node_name}/io/adc_scale"


@dataclass(frozen=True)
class IoGraph:
    """A model rewritten by :func:`add_io_quantization`."""

    model: onnx.ModelProto
    noise_inputs: list[NoiseInput]
    """The noise inputs it expects (the runner feeds them)."""
    weight_gain: dict[str, float]
    """Graph name → the factor each analog weight is stored times (1 where absent): the
    rewritten layer reads W · gain, so a runner writing a drawn weight writes it times this."""
    uses_kernels: bool = False
    """It has nodes of :data:`device_sim.kernels.DOMAIN` (a session needs the library)."""


def adc_weight_gain(weight: np.ndarray, dac: DacConfig | None, adc: AdcConfig | None) -> float:
    """The factor :func:`add_io_quantization` stores a layer's weight times (1 if none).

    With a DAC and an ADC (``bm=clip``) the layer reads the integer input codes round(x · L/s)
    (L = 2^(bits−1) − 1) and its weight times 1/(L · max|W| · step), step being the ADC's step, so
    it outputs y / (s · max|W| · step), the ADC's input in steps, directly: two full-size
    multiplications fewer per layer (``docs/benchmarks.md``). Not for float16 weights (the
    product can overflow), and 1 otherwise.
    """
    if (
        dac is None
        or adc is None
        or adc.bm_passes(dac.bits) > 1
        or weight.dtype not in (np.float32, np.float64)
    ):
        return 1.0
    w_max = float(np.max(np.abs(weight))) or 1.0
    levels = float(2 ** (dac.bits - 1) - 1)
    return float(2**adc.bits - 2) / (2.0 * adc.bound * w_max * levels)


def add_io_quantization(
    prepared: PreparedGraph,
    dac: DacConfig | None,
    adc: AdcConfig | None,
    *,
    fused: bool = False,
    threads: int = 0,
) -> IoGraph:
    """Wrap each analog layer with input (DAC) and output (ADC) quantisation and output noise.

    Per layer: s = max|x| over each input vector (per sample over C·H·W for Conv); the DAC rounds
    x/s to 2^bits − 2 steps over [−1, 1]. The ADC normalises y by s · max|W|, adds the noise input,
    clips to [−bound, bound], rounds to 2^bits − 2 steps over that range and scales back, times
    the scalar initializer :func:`adc_scale_name` (1; the runner writes each draw's drift
    compensation factor there); the bias is added after. With ``adc.bm == "iterative"`` pass
    k = 0 … K computes the layer on x/(s · 2^k) (one more MVM node per pass with a DAC, all
    reading the same weight initializer; without a DAC the one product is rescaled), each with its
    own noise input, and each output vector takes the first pass none of whose rounded outputs
    exceeds ±bound (a Gemm/MatMul row, the C_out outputs of one Conv position), else the last
    pass, clipped (:func:`_bm_nodes`).

    With a DAC and ``bm=clip``, the ADC's normalisation by max|W| and the DAC's by its levels are
    stored in the weight initializers instead of computed per sample (:func:`adc_weight_gain`).

    With ``fused`` (the library of :mod:`device_sim.kernels` is loaded into the session), float32
    layers with ``bm=clip`` get one ``DacCodes`` node for the DAC's scale and round and one
    ``AdcOutput`` node for everything after the layer's product (same operations, same order,
    same outputs; ``threads`` is their thread count, 0 = one per core); their noise inputs are
    marked :attr:`NoiseInput.fused`.

    Returns:
        The rewritten model, its noise inputs and weight gains.

    Raises:
        NoiseInjectionError: a layer whose weight is its left operand (no per-vector input range).
    """
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    graph = model.graph
    opset = _opset(model)
    by_name = {n.name: n for n in graph.node}
    noise_inputs: list[NoiseInput] = []
    gains: dict[str, float] = {}
    ops = _FusedOps(threads, _known_shapes(prepared.model))
    iterative = adc is not None and adc.bm_passes(None if dac is None else dac.bits) > 1
    for layer, tensor in enumerate(prepared.analog):
        node = by_name[tensor.node]
        if tensor.weight_input != 1 or (node.op_type == "Gemm" and _attr(node, "transA", 0)):
            raise NoiseInjectionError(
                f"dac/adc: layer {node.name!r} ({node.op_type}) has its weight on the left; "
                "only x·W layers get DAC/ADC simulation"
            )
        if node.op_type == "Gemm" and _attr(node, "alpha", 1.0) != 1.0:
            raise NoiseInjectionError(f"dac/adc: Gemm {node.name!r} has alpha != 1")
        w = prepared.weights[tensor.graph_name]
        gain = adc_weight_gain(w, dac, adc)
        # the kernels view the input as vectors along its leading axes: not a batched MatMul weight
        fusable = (
            w.dtype == np.float32 and not iterative and (node.op_type != "MatMul" or w.ndim == 2)
        )
        new_nodes, noise = _io_nodes(
            node,
            w,
            opset=opset,
            dac=dac,
            adc=adc,
            iterative=iterative,
            gained=gain != 1.0,
            fused=ops if fused and fusable else None,
            graph=graph,
            layer=layer,
        )
        noise_inputs += noise
        position = list(graph.node).index(node)
        for offset, extra in enumerate(new_nodes):
            graph.node.insert(position + 1 + offset, extra)
        if gain != 1.0:  # every analog layer has its own weight initializer (prepare)
            gains[tensor.graph_name] = gain
            slot = next(t for t in graph.initializer if t.name == tensor.graph_name)
            slot.CopyFrom(numpy_helper.from_array(scale_weight(w, gain), tensor.graph_name))
    uses_kernels = fused and any(n.domain == KERNEL_DOMAIN for n in graph.node)
    if uses_kernels:
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
        _declare_fused_shapes(graph, ops.shapes)
    _declare_window_shapes(graph, noise_inputs, ops.shapes)
    return IoGraph(model, noise_inputs, gains, uses_kernels)


def _declare_window_shapes(
    graph: onnx.GraphProto, noise: list[NoiseInput], shapes: dict[str, tuple[int | str, ...]]
) -> None:
    """Give the noise windows fed to plain nodes their layer's shape (any number of samples).

    With the shapes known, onnxruntime optimises the nodes after the ADC as it does in the fused
    graph (whose outputs are declared by :func:`_declare_fused_shapes`), so that the two compute
    the same bits.
    """
    by_name = {v.name: v for v in graph.input}
    for n in noise:
        shape = shapes.get(n.layer_output)
        if n.fused or not shape:
            continue
        declared = by_name[n.name].type.tensor_type
        declared.ClearField("shape")
        for i, dim in enumerate(shape):
            entry = declared.shape.dim.add()
            if i == 0:
                entry.dim_param = "noise_samples"
            elif isinstance(dim, int):
                entry.dim_value = dim
            else:
                entry.dim_param = dim


def _declare_fused_shapes(graph: onnx.GraphProto, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Give the custom ops' outputs the shapes that shape inference cannot.

    onnxruntime then optimises the nodes after them (fusing a Conv with a following Add, say) as
    it does in the unfused graph, so both run the same kernels in the same order.
    """
    declared = {v.name for v in graph.value_info}

    def declare(name: str, shape: tuple[int | str, ...] | None) -> None:
        if shape is not None and name not in declared:
            declared.add(name)
            graph.value_info.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))
            )

    for node in graph.node:
        if node.domain != KERNEL_DOMAIN:
            continue
        if node.op_type == "DacCodes":
            shape = shapes.get(node.input[0])
            declare(node.output[0], shape)
            per_sample = not any(a.name == "layout" and a.i == 1 for a in node.attribute)
            if shape:
                declare(
                    node.output[1],
                    (shape[0], *[1] * (len(shape) - 1)) if per_sample else (*shape[:-1], 1),
                )
        else:
            declare(node.output[0], shapes.get(node.output[0]))


def scale_weight(weight: np.ndarray, gain: float) -> np.ndarray:
    """``weight`` times ``gain`` in its own dtype (the array itself when the gain is 1)."""
    return weight if gain == 1.0 else (weight * gain).astype(weight.dtype)


def _io_nodes(  # one straight-line list of nodes, in formula order
    node: onnx.NodeProto,
    weight: np.ndarray,
    *,
    opset: int,
    dac: DacConfig | None,
    adc: AdcConfig | None,
    iterative: bool,
    gained: bool,
    fused: _FusedOps | None,
    graph: onnx.GraphProto,
    layer: int,
) -> tuple[list[onnx.NodeProto], list[NoiseInput]]:
    """Insert the pre-layer nodes before ``node`` and return the post-layer ones.

    ``iterative``: the ADC uses ``bm=iterative`` (:func:`_bm_nodes`). ``gained``: the weight is
    stored times :func:`adc_weight_gain` (not 1). ``fused``: write the
    DAC's scale and round and the ADC's chain as the custom ops of :mod:`device_sim.kernels`.
    """
    p = f"{node.name}/io/"
    dtype = weight.dtype

    made: set[str] = set()

    def const(name: str, value: float | np.ndarray) -> str:
        if p + name not in made:
            made.add(p + name)
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(value, dtype=dtype), p + name)
            )
        return p + name

    x, out = node.input[0], node.output[0]
    axes = list(range(1, weight.ndim)) if node.op_type == "Conv" else [-1]
    if dac is not None and fused is not None:  # one node: the range s and the codes
        levels = float(2 ** (dac.bits - 1) - 1)
        layout = 0 if node.op_type == "Conv" else 1
        pre = [fused.dac_node(x, p + ("xr" if gained else "x"), p + "s", levels, layout, gained)]
    else:
        pre = _abs_max_nodes(x, p + "s", axes=axes, opset=opset, graph=graph, const=const)
        if dac is not None:
            pre += _dac_nodes(x, p, dac, codes=gained, const=const)
    if dac is not None:
        node.input[0] = pre[-1].output[0]
    position = list(graph.node).index(node)
    for offset, extra in enumerate(pre):
        graph.node.insert(position + offset, extra)
    if iterative:
        assert adc is not None
        return _bm_nodes(
            node, weight, x=x, opset=opset, dac=dac, adc=adc, graph=graph, layer=layer, const=const
        )
    post: list[onnx.NodeProto] = []
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        node.input[2] = ""
        del node.input[2:]
    y = p + "y"
    node.output[0] = y
    noise: list[NoiseInput] = []
    if adc is not None:
        post, noise, after = _adc_nodes(
            node,
            weight,
            y=y,
            out=out,
            bias=bias,
            adc=adc,
            gained=gained,
            fused=fused,
            graph=graph,
            layer=layer,
            const=const,
        )
        if after is None:
            return post, noise
        y = after
    post += _bias_nodes(node, weight, bias=bias, y=y, out=out, graph=graph, const=const)
    return post, noise


def _adc_nodes(
    node: onnx.NodeProto,
    weight: np.ndarray,
    *,
    y: str,
    out: str,
    bias: str | None,
    adc: AdcConfig,
    gained: bool,
    fused: _FusedOps | None,
    graph: onnx.GraphProto,
    layer: int,
    const: Callable[[str, float | np.ndarray], str],
) -> tuple[list[onnx.NodeProto], list[NoiseInput], str | None]:
    """The ADC's nodes after the layer's product ``y`` (``bm=clip``).

    Returns the nodes, the noise inputs, and the digital output still without the bias, or None
    when the fused node already wrote the layer's output with its bias.
    """
    p = f"{node.name}/io/"
    post: list[onnx.NodeProto] = []
    noise: list[NoiseInput] = []
    w_max = float(np.max(np.abs(weight))) or 1.0
    step = 2.0 * adc.bound / (2**adc.bits - 2)
    if adc.noise > 0:
        noise.append(
            _noise_input(
                graph,
                p + "adc_noise",
                layer_output=out,
                scale=adc.noise / step,
                stream=(layer,),
                dtype=weight.dtype,
                fused=fused is not None,
            )
        )
    limit = adc.bound / step
    w_max_step = const("w_max_step", w_max * step)
    # the digital output scale (drift compensation) multiplies after the ADC, as aihwkit's
    # post_forward does; 1 unless the runner writes a draw's factor into this initializer
    scale_name = const(adc_scale_name(node.name)[len(p) :], 1.0)
    if fused is not None:
        return _fused_adc(
            node,
            weight,
            fused,
            y=y,
            out=out,
            bias=bias,
            noise=noise,
            w_max_step=w_max_step,
            scale=scale_name,
            limit=limit,
            gained=gained,
            graph=graph,
            const=const,
        )
    # in ADC steps: y / (s·max|W|·step), + noise/step, clip to ±bound/step, round, scale back;
    # with the weight gain (adc_weight_gain) the layer already outputs y / (s·max|W|·step)
    post += [
        helper.make_node("Mul", [p + "s", w_max_step], [p + "unit"]),
        helper.make_node("Mul", [p + "unit", scale_name], [p + "unit_out"]),
    ]
    yn = y
    if not gained:
        post += [
            helper.make_node("Reciprocal", [p + "unit"], [p + "per_unit"]),
            helper.make_node("Mul", [y, p + "per_unit"], [p + "yn"]),
        ]
        yn = p + "yn"
    if noise:
        post.append(helper.make_node("Add", [yn, noise[0].name], [p + "ynz"]))
        yn = p + "ynz"
    post += [
        helper.make_node("Clip", [yn, const("lo", -limit), const("hi", limit)], [p + "yc"]),
        helper.make_node("Round", [p + "yc"], [p + "yr"]),
        helper.make_node("Mul", [p + "yr", p + "unit_out"], [p + "yd"]),
    ]
    return post, noise, p + "yd"


def _fused_adc(
    node: onnx.NodeProto,
    weight: np.ndarray,
    fused: _FusedOps,
    *,
    y: str,
    out: str,
    bias: str | None,
    noise: list[NoiseInput],
    w_max_step: str,
    scale: str,
    limit: float,
    gained: bool,
    graph: onnx.GraphProto,
    const: Callable[[str, float | np.ndarray], str],
) -> tuple[list[onnx.NodeProto], list[NoiseInput], str | None]:
    """:func:`_adc_nodes` as one ``AdcOutput`` node.

    The node also takes the layer's bias when it has one value per channel, then a residual Add
    that only it feeds (standing in that Add's place), then a Relu that only it (or that Add)
    feeds.
    """
    p = f"{node.name}/io/"
    b = _channel_bias(node, weight, bias=bias, graph=graph)
    done = b is not None or bias is None  # the node adds the bias (if any) itself
    add = fused.residual_add(graph, out) if done else None
    final = out if add is None else add.output[0]
    relu = _sole_relu(graph, final) if done else None
    if relu is not None:
        final = relu.output[0]
        graph.node.remove(relu)
    adc_node = fused.adc_node(
        [y, p + "s", w_max_step, scale],
        bias=const("bias_channels", b) if b is not None else "",
        noise=noise[0].name if noise else "",
        residual="" if add is None else next(i for i in add.input if i != out),
        out=final if done else p + "yd",
        limit=limit,
        layout=0 if node.op_type == "Conv" else 1,
        relu=relu is not None,
        gained=gained,
    )
    if add is not None:  # in the Add's place, where its other input has been computed
        add.CopyFrom(adc_node)
        return [], noise, None
    return [adc_node], noise, None if done else p + "yd"


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str, ...]]:
    """Value name → shape, for the values whose every dimension shape inference knows.

    A dimension is known as a size or as a symbol (the same symbol: the same size).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        return {}
    shapes: dict[str, tuple[int | str, ...]] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        if all(d != "" for d in dims):
            shapes[value.name] = tuple(dims)
    return shapes


def _sole_reader(graph: onnx.GraphProto, value: str) -> onnx.NodeProto | None:
    """The one node reading ``value`` (subgraphs included) when it is not a graph output."""
    if any(o.name == value for o in graph.output):
        return None
    readers = [n for n in graph.node if value in n.input or value in _subgraph_inputs(n)]
    return readers[0] if len(readers) == 1 else None


def _is_standard(node: onnx.NodeProto | None, op_type: str) -> bool:
    """``node`` is the ONNX operator ``op_type`` (default domain)."""
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _sole_relu(graph: onnx.GraphProto, value: str) -> onnx.NodeProto | None:
    """The standard Relu node that is the only reader of ``value`` (not a graph output), or None.

    Only a Relu node: a fused ``AdcOutput`` that reads ``value`` as its residual also applies a
    Relu, but after adding its own layer's output, which must not be dropped.
    """
    reader = _sole_reader(graph, value)
    return reader if _is_standard(reader, "Relu") else None


def _is_relu(node: onnx.NodeProto) -> bool:
    """A standard Relu, or a fused ``AdcOutput`` that applies one (its output is ≥ 0)."""
    if _is_standard(node, "Relu"):
        return True
    return (
        node.op_type == "AdcOutput"
        and node.domain == KERNEL_DOMAIN
        and any(a.name == "relu" and a.i == 1 for a in node.attribute)
    )


def _noise_input(
    graph: onnx.GraphProto,
    name: str,
    *,
    layer_output: str,
    scale: float,
    stream: tuple[int, ...],
    dtype: np.dtype,
    fused: bool,
) -> NoiseInput:
    """Declare the graph input(s) of one ADC noise input (a fused one also has its start)."""
    graph.input.append(
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
    )
    if fused:
        graph.input.append(
            helper.make_tensor_value_info(noise_start_name(name), onnx.TensorProto.INT64, [1])
        )
    return NoiseInput(name, layer_output, scale, stream, fused)


def _dac_nodes(
    x: str,
    p: str,
    dac: DacConfig,
    *,
    codes: bool,
    const: Callable[[str, float | np.ndarray], str],
) -> list[onnx.NodeProto]:
    """The DAC's nodes: x_q = round(x · L/s) · s/L, after the range nodes (``p + "s"``).

    The last node's output is the layer's new input: x_q, or with ``codes`` the integer codes
    round(x · L/s) (the weight gain then holds 1/L, :func:`adc_weight_gain`). The per-sample
    factors are tiny tensors.
    """
    levels = float(2 ** (dac.bits - 1) - 1)
    nodes = [helper.make_node("Div", [const("dac_levels", levels), p + "s"], [p + "to_int"])]
    if not codes:
        nodes.append(helper.make_node("Div", [p + "s", const("dac_levels", levels)], [p + "to_x"]))
    nodes += [
        helper.make_node("Mul", [x, p + "to_int"], [p + "xl"]),
        helper.make_node("Round", [p + "xl"], [p + "xr"]),
    ]
    if codes:
        return nodes
    return [*nodes, helper.make_node("Mul", [p + "xr", p + "to_x"], [p + "x"])]


@dataclass(frozen=True)
class _FusedOps:
    """Writes the custom-op nodes of :mod:`device_sim.kernels` (``threads``: 0 = one per core)."""

    threads: int
    shapes: dict[str, tuple[int | str, ...]]
    """Inferred shapes of the prepared graph's values (those fully known)."""

    def residual_add(self, graph: onnx.GraphProto, value: str) -> onnx.NodeProto | None:
        """The standard two-input Add that is ``value``'s only reader, or None.

        Only when its other input has ``value``'s shape (the node does not broadcast).
        """
        add = _sole_reader(graph, value)
        if add is None or not _is_standard(add, "Add") or len(add.input) != 2:
            return None
        other = [i for i in add.input if i != value]
        if len(other) != 1 or value not in self.shapes:
            return None
        return add if self.shapes.get(other[0]) == self.shapes[value] else None

    def dac_node(  # noqa: PLR0917  # the op's outputs and attributes, in order
        self, x: str, out: str, s: str, levels: float, layout: int, codes: bool
    ) -> onnx.NodeProto:
        """``DacCodes``: rint(x · L/s) (· s/L unless ``codes``), and the ranges s.

        s = max(max|x|, tiny) of each input vector: a sample, or with ``layout`` 1 a row of the
        last axis.
        """
        return helper.make_node(
            "DacCodes",
            [x],
            [out, s],
            domain=KERNEL_DOMAIN,
            levels=levels,
            layout=layout,
            tiny=_TINY,
            codes=int(codes),
            threads=self.threads,
        )

    def adc_node(  # the op's inputs and attributes, by name
        self,
        head: list[str],
        *,
        bias: str,
        noise: str,
        residual: str,
        out: str,
        limit: float,
        layout: int,
        relu: bool,
        gained: bool,
    ) -> onnx.NodeProto:
        """``AdcOutput`` on ``head`` = (y, s, max|W|·step, digital scale); see ``io_kernels.c``."""
        start = noise_start_name(noise) if noise else ""
        inputs = [*head, bias, noise, start, residual]
        while not inputs[-1]:
            inputs.pop()
        return helper.make_node(
            "AdcOutput",
            inputs,
            [out],
            domain=KERNEL_DOMAIN,
            limit=float(limit),
            layout=layout,
            relu=int(relu),
            gained=int(gained),
            threads=self.threads,
        )


def _channel_bias(
    node: onnx.NodeProto, weight: np.ndarray, *, bias: str | None, graph: onnx.GraphProto
) -> np.ndarray | None:
    """The layer's bias as one value per output channel, or None.

    None: no bias, or a Gemm bias that varies along the batch (added by its own node then).
    """
    b = _stored_bias(node, bias=bias, graph=graph)
    if b is None:
        return None
    if node.op_type == "Conv":
        return b.reshape(-1)
    channels = weight.shape[0] if _attr(node, "transB", 0) else weight.shape[-1]
    if b.size == channels and b.ndim <= 2 and (b.ndim < 2 or b.shape[0] == 1):
        return b.reshape(-1)
    return None


def _bias_nodes(
    node: onnx.NodeProto,
    weight: np.ndarray,
    *,
    bias: str | None,
    y: str,
    out: str,
    graph: onnx.GraphProto,
    const: Callable[[str, float | np.ndarray], str],
) -> list[onnx.NodeProto]:
    """The digital bias after the ADC (an Identity without one), writing the layer's output.

    A bias computed by the graph (not an initializer) is shaped (Conv: one value per channel)
    and scaled (Gemm's beta) by nodes.
    """
    if bias is None:
        return [helper.make_node("Identity", [y], [out])]
    b = _stored_bias(node, bias=bias, graph=graph)
    if b is None:
        p = f"{node.name}/io/"
        nodes: list[onnx.NodeProto] = []
        if node.op_type == "Conv":
            shape = np.array([-1] + [1] * (weight.ndim - 2), dtype=np.int64)
            graph.initializer.append(numpy_helper.from_array(shape, p + "bias_shape"))
            nodes.append(helper.make_node("Reshape", [bias, p + "bias_shape"], [p + "bias_c"]))
            bias = p + "bias_c"
        elif node.op_type == "Gemm" and float(_attr(node, "beta", 1.0)) != 1.0:
            beta = const("beta", float(_attr(node, "beta", 1.0)))
            nodes.append(helper.make_node("Mul", [bias, beta], [p + "bias_beta"]))
            bias = p + "bias_beta"
        return [*nodes, helper.make_node("Add", [y, bias], [out])]
    if node.op_type == "Conv":
        b = b.reshape((-1,) + (1,) * (weight.ndim - 2))
    return [helper.make_node("Add", [y, const("bias", b)], [out])]


def _stored_bias(
    node: onnx.NodeProto, *, bias: str | None, graph: onnx.GraphProto
) -> np.ndarray | None:
    """The layer's bias initializer (times a Gemm's beta), or None when the graph computes it."""
    stored = next((t for t in graph.initializer if t.name == bias), None) if bias else None
    if stored is None:
        return None
    b = numpy_helper.to_array(stored)
    return b * float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else b


def _bm_nodes(
    node: onnx.NodeProto,
    weight: np.ndarray,
    *,
    x: str,
    opset: int,
    dac: DacConfig | None,
    adc: AdcConfig,
    graph: onnx.GraphProto,
    layer: int,
    const: Callable[[str, float | np.ndarray], str],
) -> tuple[list[onnx.NodeProto], list[NoiseInput]]:
    """ADC with aihwkit's iterative bound management, per output vector (after the pre-nodes).

    Pass k = 0 … K (K from :meth:`AdcConfig.bm_passes`) reads x/(s · 2^k): with a DAC, its own
    copy of the layer node (same weight initializer) on the input requantised on that grid;
    without one, pass 0's product times 2^−k (exact). In ADC steps its output is
    round(y/(s · 2^k · max|W| · step) + noise_k); the vector (a Gemm/MatMul row, the C_out outputs
    of one Conv position) is saturated when any |code| > bound/step (aihwkit tests the rounded
    noisy output with ``>``). Each vector takes the first unsaturated pass, else the last pass
    clipped to ±bound/step; the codes times s · 2^k · max|W| · step times the digital scale,
    plus the bias, are the output. Pass 0 is computed exactly as ``bm=clip`` computes it, so the
    two differ only on vectors saturated at pass 0.
    """
    p = f"{node.name}/io/"
    dtype = weight.dtype
    passes = adc.bm_passes(None if dac is None else dac.bits)
    out = node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        node.input[2] = ""
        del node.input[2:]
    node.output[0] = p + "y"
    products = _bm_products(node, x, passes=passes, dac=dac, graph=graph, const=const)
    w_max = float(np.max(np.abs(weight))) or 1.0
    step = 2.0 * adc.bound / (2**adc.bits - 2)
    limit = adc.bound / step
    bm_axes = [1] if node.op_type == "Conv" else [-1]
    post: list[onnx.NodeProto] = []
    noise: list[NoiseInput] = []
    codes: list[str] = []
    units: list[str] = []
    passed: list[str] = []
    for k in range(passes):
        q = p if k == 0 else f"{p}bm{k}/"
        suffix = "" if k == 0 else str(k)
        post += [
            helper.make_node(
                "Mul", [p + "s", const(f"w_max_step{suffix}", w_max * step * 2.0**k)], [q + "unit"]
            ),
            helper.make_node("Reciprocal", [q + "unit"], [q + "per_unit"]),
            helper.make_node("Mul", [products[k], q + "per_unit"], [q + "yn"]),
        ]
        yn = q + "yn"
        if adc.noise > 0:
            noise.append(
                _noise_input(
                    graph,
                    p + f"adc_noise{suffix}",
                    layer_output=out,
                    scale=adc.noise / step,
                    stream=(layer,) if k == 0 else (layer, k),
                    dtype=dtype,
                    fused=False,
                )
            )
            post.append(helper.make_node("Add", [yn, noise[-1].name], [q + "ynz"]))
            yn = q + "ynz"
        if k == passes - 1:
            post += [
                helper.make_node("Clip", [yn, const("lo", -limit), const("hi", limit)], [q + "yc"]),
                helper.make_node("Round", [q + "yc"], [q + "yr"]),
            ]
        else:
            post += [
                helper.make_node("Round", [yn], [q + "yr"]),
                helper.make_node("Abs", [q + "yr"], [q + "yabs"]),
                _reduce(
                    "ReduceMax",
                    q + "yabs",
                    q + "ymax",
                    axes=bm_axes,
                    opset=opset,
                    axes_name=p + "bm_axes",
                    graph=graph,
                ),
                # codes are integers: |code| > limit  <=>  not (max |code| < limit + 1/2)
                helper.make_node(
                    "Less", [q + "ymax", const("bm_ok_below", limit + 0.5)], [q + "ok"]
                ),
            ]
            passed.append(q + "ok")
        codes.append(q + "yr")
        units.append(q + "unit")
    code, unit = codes[-1], units[-1]
    for k in range(passes - 2, -1, -1):
        q = f"{p}bm{k}/sel_"
        post += [
            helper.make_node("Where", [passed[k], codes[k], code], [q + "code"]),
            helper.make_node("Where", [passed[k], units[k], unit], [q + "unit"]),
        ]
        code, unit = q + "code", q + "unit"
    scale_name = const(adc_scale_name(node.name)[len(p) :], 1.0)
    post += [
        helper.make_node("Mul", [unit, scale_name], [p + "unit_out"]),
        helper.make_node("Mul", [code, p + "unit_out"], [p + "yd"]),
    ]
    post += _bias_nodes(node, weight, bias=bias, y=p + "yd", out=out, graph=graph, const=const)
    return post, noise


def _bm_products(
    node: onnx.NodeProto,
    x: str,
    *,
    passes: int,
    dac: DacConfig | None,
    graph: onnx.GraphProto,
    const: Callable[[str, float | np.ndarray], str],
) -> list[str]:
    """The layer outputs of passes 0 … passes − 1 (``node`` computes pass 0's, on x/s).

    With a DAC, pass k ≥ 1 gets its own copy of ``node`` (same weight initializer) on x
    requantised on the grid of x/(s · 2^k), inserted before ``node``; without one, every pass
    reads pass 0's product (the ADC normalisation then divides by 2^k, exactly).
    """
    p = f"{node.name}/io/"
    inserted: list[onnx.NodeProto] = []
    products = [p + "y"]
    if dac is not None:
        levels = float(2 ** (dac.bits - 1) - 1)
        for k in range(1, passes):
            q = f"{p}bm{k}/"
            inserted += [
                helper.make_node("Mul", [p + "s", const(f"bm{k}/reduction", 2.0**k)], [q + "s"]),
                helper.make_node("Div", [const("dac_levels", levels), q + "s"], [q + "to_int"]),
                helper.make_node("Div", [q + "s", const("dac_levels", levels)], [q + "to_x"]),
                helper.make_node("Mul", [x, q + "to_int"], [q + "xl"]),
                helper.make_node("Round", [q + "xl"], [q + "xr"]),
                helper.make_node("Mul", [q + "xr", q + "to_x"], [q + "x"]),
            ]
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = q + node.op_type
            copy.input[0] = q + "x"
            copy.output[0] = q + "y"
            inserted.append(copy)
            products.append(q + "y")
        # before the layer node (after the pre-nodes): add_io_quantization puts the ADC after it
        position = list(graph.node).index(node)
        for offset, extra in enumerate(inserted):
            graph.node.insert(position + offset, extra)
    else:
        products *= passes
    return products


def _abs_max_nodes(
    x: str,
    out: str,
    *,
    axes: list[int],
    opset: int,
    graph: onnx.GraphProto,
    const: Callable[[str, float | np.ndarray], str],
) -> list[onnx.NodeProto]:
    """Nodes computing the input range s = max(max|x| over ``axes`` (kept), tiny) per vector.

    max|x| = max(max x, −min x): two reductions and no full-size |x| tensor; after a Relu, max x.
    """
    axes_name = f"{out}_axes"
    nodes = [
        _reduce(
            "ReduceMax", x, out + "_max", axes=axes, opset=opset, axes_name=axes_name, graph=graph
        )
    ]
    largest = [out + "_max"]
    if not any(_is_relu(n) and x in n.output for n in graph.node):
        nodes += [
            _reduce(
                "ReduceMin",
                x,
                out + "_min",
                axes=axes,
                opset=opset,
                axes_name=axes_name,
                graph=graph,
            ),
            helper.make_node("Neg", [out + "_min"], [out + "_negmin"]),
        ]
        largest.append(out + "_negmin")
    return [*nodes, helper.make_node("Max", [*largest, const("tiny", _TINY)], [out])]


def _reduce(
    op: str,
    x: str,
    out: str,
    *,
    axes: list[int],
    opset: int,
    axes_name: str,
    graph: onnx.GraphProto,
) -> onnx.NodeProto:
    """``op`` (ReduceMax/ReduceMin) with keepdims over ``axes`` (an initializer from opset 18)."""
    if opset < 18:
        return helper.make_node(op, [x], [out], axes=axes, keepdims=1)
    if not any(t.name == axes_name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
    return helper.make_node(op, [x, axes_name], [out], keepdims=1)


def replicate(
    model: onnx.ModelProto, input_name: str, per_copy: Iterable[str], copies: int
) -> onnx.ModelProto:
    """A model with ``copies`` copies of ``model``'s graph sharing its data input.

    Names in ``per_copy`` (weights, noise inputs) and every node output get the prefix ``c{k}/`` in
    copy ``k``; other initializers are shared. Outputs are ``c{k}/<output>`` in copy order.
    """
    graph = model.graph
    private = set(per_copy)
    shared = {t.name for t in graph.initializer if t.name not in private} | {input_name}
    nodes: list[onnx.NodeProto] = []
    inputs = [i for i in graph.input if i.name == input_name]
    outputs: list[onnx.ValueInfoProto] = []
    initializers = [t for t in graph.initializer if t.name in shared]
    value_info: list[onnx.ValueInfoProto] = []
    for k in range(copies):

        def rename(name: str, k: int = k) -> str:
            return name if (not name or name in shared) else f"c{k}/{name}"

        for i, node in enumerate(graph.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"c{k}/{node.name or node.op_type}#{i}"
            copy.input[:] = [rename(i) for i in node.input]
            copy.output[:] = [rename(o) for o in node.output]
            nodes.append(copy)
        for values, target in ((graph.input, inputs), (graph.output, outputs)):
            for value in values:
                if value.name == input_name:
                    continue
                renamed = onnx.ValueInfoProto()
                renamed.CopyFrom(value)
                renamed.name = rename(value.name)
                target.append(renamed)
        for tensor in graph.initializer:
            if tensor.name in private:
                renamed_tensor = onnx.TensorProto()
                renamed_tensor.CopyFrom(tensor)
                renamed_tensor.name = rename(tensor.name)
                initializers.append(renamed_tensor)
        for info in graph.value_info:
            renamed_info = onnx.ValueInfoProto()
            renamed_info.CopyFrom(info)
            renamed_info.name = rename(info.name)
            value_info.append(renamed_info)
    out = helper.make_model(
        helper.make_graph(
            nodes, graph.name or "replicated", inputs, outputs, initializers, value_info=value_info
        ),
        opset_imports=list(model.opset_import),
    )
    out.ir_version = model.ir_version
    return out


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """True when a node carries a subgraph (If/Loop/Scan), which :func:`replicate` cannot rename."""
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in model.graph.node
        for a in n.attribute
    )
