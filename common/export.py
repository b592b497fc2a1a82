"""torch -> ONNX export of encoders and classifiers, checked against torch in onnxruntime.

Every export runs the written file in onnxruntime on a real sample and compares it with the
torch module: the largest absolute difference must not exceed
``EXPORT_TOLERANCE * max(1, max |torch output|)``, i.e. 1e-5 absolute for outputs up to 1 and
1e-5 relative to the largest output beyond that (float32 arithmetic in a different kernel order
differs by a few ulp: about 1e-7 on latents and 1e-5 on logits of magnitude ~20 here).

Graphs have a dynamic batch axis and opset :data:`OPSET`. Encoders read ``image``
``(N, C, H, W)`` and write ``latent`` ``(N, latent_dim)``; classifiers read ``latent`` and write
``logits``. :func:`compose_pipeline` joins an encoder and a classifier into one graph
``image -> logits`` (node and initializer names prefixed ``encoder/`` and ``classifier/``), so
the analog simulator can evaluate both halves together.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from torch import nn

from common.errors import ModelExportError
from common.models import ConvAutoencoder
from common.types import FloatArray

logger = logging.getLogger(__name__)

OPSET = 18
"""ONNX opset of exported graphs."""

EXPORT_TOLERANCE = 1e-5
"""Allowed max |onnxruntime - torch| on the check sample, times max(1, max |torch output|)."""

ENCODER_INPUT = "image"
"""Input name of exported encoders (and of composed pipelines)."""

LATENT = "latent"
"""Output name of exported encoders, input name of exported classifiers."""

LOGITS = "logits"
"""Output name of exported classifiers (and of composed pipelines)."""

ENCODER_PREFIX = "encoder/"
"""Prefix of encoder node, initializer and edge names in a composed pipeline."""

CLASSIFIER_PREFIX = "classifier/"
"""Prefix of classifier node, initializer and edge names in a composed pipeline."""


class Exporter(enum.Enum):
    """Which torch exporter writes the graph."""

    AUTO = "auto"
    """TorchScript exporter, falling back to the dynamo exporter if it fails."""
    TORCHSCRIPT = "torchscript"
    """``torch.onnx.export(..., dynamo=False)``: compact Conv/Gemm graphs."""
    DYNAMO = "dynamo"
    """``torch.onnx.export(..., dynamo=True)`` (needs onnxscript)."""


def export_encoder(
    model: ConvAutoencoder,
    path: str | Path,
    sample: FloatArray,
    *,
    exporter: Exporter = Exporter.AUTO,
) -> float:
    """Export ``model.encoder`` to ONNX and check it against torch on ``sample``.

    Args:
        model: A trained autoencoder.
        path: Where to write the ``.onnx`` file (parent folders are created).
        sample: Real images, float32 ``(N, C, H, W)``, N >= 1, to check the export on.
        exporter: Which torch exporter to use.

    Returns:
        max |onnxruntime - torch| over ``sample`` (within the tolerance of the module docstring).

    Raises:
        ModelExportError: the export fails, or disagrees with torch by more than that tolerance.
    """
    return _export(model.encoder, Path(path), sample, (ENCODER_INPUT, LATENT), exporter)


def export_classifier(
    network: nn.Module,
    path: str | Path,
    sample: FloatArray,
    *,
    exporter: Exporter = Exporter.AUTO,
) -> float:
    """Export a classifier network (latents -> logits) to ONNX and check it on ``sample``.

    Args:
        network: E.g. ``LatentClassifier.node_network(node_id)`` (takes raw latents).
        path: Where to write the ``.onnx`` file.
        sample: Real latents, float32 ``(N, latent_dim)``, N >= 1.
        exporter: Which torch exporter to use.

    Returns:
        max |onnxruntime - torch| over ``sample`` (within the tolerance of the module docstring).

    Raises:
        ModelExportError: the export fails, or disagrees with torch by more than that tolerance.
    """
    return _export(network, Path(path), sample, (LATENT, LOGITS), exporter)


def export_network(
    network: nn.Module,
    path: str | Path,
    sample: FloatArray,
    *,
    exporter: Exporter = Exporter.AUTO,
) -> float:
    """Export a whole network (images ``image`` -> class scores ``logits``) and check it.

    Args:
        network: E.g. a zoo network (``common.zoo``), a base model or a fine-tuned one.
        path: Where to write the ``.onnx`` file.
        sample: Real images, float32 ``(N, C, H, W)``, N >= 1.
        exporter: Which torch exporter to use.

    Returns:
        max |onnxruntime - torch| over ``sample`` (within the tolerance of the module docstring).

    Raises:
        ModelExportError: the export fails, or disagrees with torch by more than that tolerance.
    """
    return _export(network, Path(path), sample, (ENCODER_INPUT, LOGITS), exporter)


def compose_pipeline(
    encoder_onnx: str | Path, classifier_onnx: str | Path, out_path: str | Path
) -> Path:
    """Join an exported encoder and classifier into one ONNX graph ``image -> logits``.

    Args:
        encoder_onnx: File written by :func:`export_encoder`.
        classifier_onnx: File written by :func:`export_classifier` for the same node.
        out_path: Where to write the composed graph.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ModelExportError: a file is missing or unreadable, the names are not the exported
            ones, the latent sizes differ, or the opsets differ.
    """
    encoder = _load(Path(encoder_onnx))
    classifier = _load(Path(classifier_onnx))
    _expect_io(encoder, Path(encoder_onnx), ENCODER_INPUT, LATENT)
    _expect_io(classifier, Path(classifier_onnx), LATENT, LOGITS)
    enc_dim = _last_dim(encoder.graph.output[0])
    cls_dim = _last_dim(classifier.graph.input[0])
    if enc_dim != cls_dim:
        raise ModelExportError(
            f"encoder {str(encoder_onnx)!r} writes latents of size {enc_dim} but classifier "
            f"{str(classifier_onnx)!r} reads size {cls_dim}"
        )
    enc_opset = _default_opset(encoder)
    cls_opset = _default_opset(classifier)
    if enc_opset != cls_opset:
        raise ModelExportError(
            f"encoder uses opset {enc_opset} but classifier uses opset {cls_opset}; "
            "export both with the same exporter"
        )
    encoder = onnx.compose.add_prefix(encoder, ENCODER_PREFIX, rename_inputs=False)
    classifier = onnx.compose.add_prefix(classifier, CLASSIFIER_PREFIX, rename_outputs=False)
    classifier.ir_version = encoder.ir_version = min(encoder.ir_version, classifier.ir_version)
    try:
        merged = onnx.compose.merge_models(
            encoder,
            classifier,
            io_map=[(ENCODER_PREFIX + LATENT, CLASSIFIER_PREFIX + LATENT)],
            name="encoder_classifier",
        )
        onnx.checker.check_model(merged, full_check=True)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ModelExportError(
            f"cannot compose {encoder_onnx} and {classifier_onnx}: {exc}"
        ) from exc
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, out)
    logger.info("composed %s + %s -> %s", encoder_onnx, classifier_onnx, out)
    return out


def _export(
    module: nn.Module,
    path: Path,
    sample: FloatArray,
    names: tuple[str, str],
    exporter: Exporter,
) -> float:
    input_name, output_name = names
    if sample.dtype != np.float32 or len(sample) == 0:
        raise ModelExportError(
            f"export check needs a non-empty float32 sample, got {sample.dtype} {sample.shape}"
        )
    if module.training:
        raise ModelExportError("export needs the module in eval mode (call module.eval())")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelExportError(f"cannot create the folder of {str(path)!r}: {exc}") from exc
    example = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    if exporter is Exporter.AUTO:
        try:
            _torchscript_export(module, example, path, input_name, output_name)
        except ModelExportError as exc:
            logger.warning("TorchScript export failed (%s); trying the dynamo exporter", exc)
            _dynamo_export(module, example, path, input_name, output_name)
    elif exporter is Exporter.TORCHSCRIPT:
        _torchscript_export(module, example, path, input_name, output_name)
    else:
        _dynamo_export(module, example, path, input_name, output_name)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run([output_name], {input_name: np.ascontiguousarray(sample)})
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelExportError(f"onnxruntime cannot run the export {str(path)!r}: {exc}") from exc
    with torch.no_grad():
        torch_out = module(torch.from_numpy(np.ascontiguousarray(sample))).numpy()
    if onnx_out.shape != torch_out.shape:
        raise ModelExportError(
            f"{str(path)!r}: onnxruntime output shape {onnx_out.shape} differs from torch "
            f"{torch_out.shape}"
        )
    diff = float(np.max(np.abs(onnx_out - torch_out)))
    tolerance = EXPORT_TOLERANCE * max(1.0, float(np.max(np.abs(torch_out))))
    if not diff <= tolerance:
        raise ModelExportError(
            f"{str(path)!r}: onnxruntime differs from torch by max |diff| {diff:.3g} on "
            f"{len(sample)} samples; tolerance {tolerance:.3g}"
        )
    logger.info("exported %s: %d samples checked, max |onnx - torch| %.3g", path, len(sample), diff)
    return diff


def _torchscript_export(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str
) -> None:
    with warnings.catch_warnings():
        # torch announces the TorchScript exporter's deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        except Exception as exc:  # the exporter raises many unrelated types (and OSError)
            raise ModelExportError(f"ONNX export to {str(path)!r} failed: {exc}") from exc


def _dynamo_export(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str
) -> None:
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            # torch.export emits pytree deprecation notices we do not control
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export raises many unrelated types
        raise ModelExportError(f"dynamo export to {str(path)!r} failed: {exc}") from exc
    finally:
        logger.debug("dynamo exporter output: %s", chatter.getvalue().strip())
    if program is None:
        raise ModelExportError(f"dynamo export to {str(path)!r} returned no program")
    program.save(str(path))


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except (OSError, DecodeError) as exc:
        raise ModelExportError(f"cannot read ONNX file {str(path)!r}: {exc}") from exc


def _expect_io(model: onnx.ModelProto, path: Path, input_name: str, output_name: str) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs != [output_name]:
        raise ModelExportError(
            f"{str(path)!r}: expected input [{input_name!r}] and output [{output_name!r}], "
            f"got {inputs} and {outputs}"
        )


def _last_dim(value: onnx.ValueInfoProto) -> int:
    return int(value.type.tensor_type.shape.dim[-1].dim_value)


def _default_opset(model: onnx.ModelProto) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
