"""Model files: safetensors bytes, content hash, round trips and refusals."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

from common.errors import ConfigError
from common.modelfile import (
    FORMAT,
    ModelFile,
    content_hash,
    from_torch,
    parse_model_bytes,
    read_model_file,
    write_model_file,
)
from common.zoo import ModelSpec, build_model, model_state

SPEC = ModelSpec("mlp", 1, 8, 8, 10)


def _trained_stats(spec: ModelSpec) -> torch.nn.Module:
    """A network whose BatchNorm statistics moved away from their initial values."""
    net = build_model(spec, seed=1)
    net.train()
    with torch.no_grad():
        for i in range(3):
            net(torch.rand((8, spec.in_channels, spec.height, spec.width)) + i)
    return net.eval()


def _safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    return bytes(safetensors.numpy.save(arrays, metadata=metadata))


@pytest.mark.parametrize(
    "spec",
    [SPEC, ModelSpec("lenet", 1, 8, 8, 10), ModelSpec("resnet8", 3, 8, 8, 4)],
    ids=lambda s: s.name,
)
def test_round_trip_gives_the_same_tensors_and_outputs(spec: ModelSpec, tmp_path: Path) -> None:
    net = _trained_stats(spec)
    model = from_torch(spec, net, {"source_data": "digits", "note": "x=1"})
    path = tmp_path / "m.safetensors"
    digest = write_model_file(model, path)
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest() == content_hash(data)
    assert not (tmp_path / "m.safetensors.tmp").exists()
    back, read_digest = read_model_file(path)
    assert read_digest == digest
    assert back.spec == spec and back.meta == {"source_data": "digits", "note": "x=1"}
    state = model_state(net)
    assert set(back.tensors) == set(state)  # parameters + BN statistics, no num_batches_tracked
    for name, tensor in state.items():
        assert back.tensors[name].dtype == np.float32
        assert back.tensors[name].tobytes() == tensor.numpy().tobytes(), name
    rebuilt = back.to_torch()
    assert not rebuilt.training
    x = torch.rand((5, spec.in_channels, spec.height, spec.width))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_any_safetensors_reader_opens_it(tmp_path: Path) -> None:
    model = from_torch(SPEC, build_model(SPEC, seed=0))
    path = tmp_path / "m.safetensors"
    write_model_file(model, path)
    arrays = safetensors.numpy.load_file(str(path))
    assert set(arrays) == set(model.tensors)
    for k, v in model.tensors.items():
        np.testing.assert_array_equal(arrays[k], v)
    with safetensors.safe_open(str(path), framework="np") as fh:
        meta = fh.metadata()
    assert meta["latentedge.format"] == FORMAT == "model/1"
    assert ModelSpec.from_json(meta["latentedge.spec"]) == SPEC
    assert json.loads(meta["latentedge.spec"]) == {
        "name": "mlp",
        "in_channels": 1,
        "height": 8,
        "width": 8,
        "num_classes": 10,
        "norm": "",
    }
    # no pickle anywhere: the header is JSON and the rest raw float32 data
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    json.loads(data[8 : 8 + n])


def test_bytes_are_deterministic_for_equal_content() -> None:
    # the content hash names base versions and fine-tuned models: equal content, equal bytes
    model = from_torch(SPEC, build_model(SPEC, seed=0), {"a": "1", "b": "2", "c": "3"})
    same = ModelFile(
        SPEC,
        {k: v.copy() for k, v in reversed(list(model.tensors.items()))},
        {"c": "3", "b": "2", "a": "1"},
    )
    digests = {content_hash(model.to_bytes()) for _ in range(10)}
    digests |= {content_hash(same.to_bytes()) for _ in range(10)}
    assert len(digests) == 1


def test_different_content_gives_a_different_hash() -> None:
    a = from_torch(SPEC, build_model(SPEC, seed=0))
    tensors = {k: v.copy() for k, v in a.tensors.items()}
    tensors["head.bias"][3] = np.nextafter(tensors["head.bias"][3], np.float32(np.inf))
    b = ModelFile(SPEC, tensors)
    c = ModelFile(SPEC, a.tensors, {"x": "y"})
    assert len({content_hash(m.to_bytes()) for m in (a, b, c)}) == 3


def test_shapes_lists_every_tensor() -> None:
    model = from_torch(SPEC, build_model(SPEC, seed=0))
    assert model.shapes() == {
        "features.1.weight": (256, 64),
        "features.1.bias": (256,),
        "last_block.0.weight": (128, 256),
        "last_block.0.bias": (128,),
        "head.weight": (10, 128),
        "head.bias": (10,),
    }


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"abc",
        b"not a model file at all, just some text",
        (10**9).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        pickle.dumps({"head.weight": [1.0, 2.0]}),
    ],
    ids=["empty", "short", "text", "header-too-long", "header-not-object", "pickle"],
)
def test_refuses_what_is_not_safetensors(data: bytes) -> None:
    with pytest.raises(ConfigError, match=r"upload.bin is not a safetensors model file"):
        parse_model_bytes(data, "upload.bin")


def test_refuses_a_torch_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "base.pt"
    torch.save(build_model(SPEC, seed=0).state_dict(), path)
    with pytest.raises(ConfigError, match=r"base.pt.* is not a safetensors model file"):
        read_model_file(path)


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read model file .*missing.safetensors"):
        read_model_file(tmp_path / "missing.safetensors")


ARRAYS = {"head.weight": np.zeros((10, 128), np.float32)}


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, r"metadata latentedge.format must be 'model/1', got None"),
        ({"latentedge.format": "model/2"}, r"latentedge.format must be 'model/1', got 'model/2'"),
        ({"latentedge.format": "model/1"}, r"not a model spec: ''"),
        ({"latentedge.format": "model/1", "latentedge.spec": "{nope"}, r"not a model spec"),
        (
            {"latentedge.format": "model/1", "latentedge.spec": '{"name": "mlp"}'},
            r"not a model spec",
        ),
        (
            {
                "latentedge.format": "model/1",
                "latentedge.spec": json.dumps(
                    {"name": "vgg", "in_channels": 1, "height": 8, "width": 8, "num_classes": 10}
                ),
            },
            r"model must be one of \['mlp', 'lenet', 'resnet8', .*\], got 'vgg'",
        ),
    ],
)
def test_refuses_wrong_format_metadata(metadata: dict[str, str] | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_bytes(_safetensors(ARRAYS, metadata))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64])
def test_refuses_tensors_that_are_not_float32(dtype: type) -> None:
    meta = {"latentedge.format": FORMAT, "latentedge.spec": SPEC.to_json()}
    arrays = {"head.bias": np.zeros(10, dtype)}
    with pytest.raises(ConfigError, match=rf"m: tensor 'head.bias' is {np.dtype(dtype)}"):
        parse_model_bytes(_safetensors(arrays, meta), "m")


def test_to_torch_refuses_tensors_that_do_not_fit_the_spec() -> None:
    good = from_torch(SPEC, build_model(SPEC, seed=0)).tensors
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    with pytest.raises(ConfigError, match=r"missing tensors \['head.bias'\], unknown tensors \[\]"):
        ModelFile(SPEC, missing).to_torch()
    extra = {**good, "extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConfigError, match=r"unknown tensors \['extra.weight'\]"):
        ModelFile(SPEC, extra).to_torch()
    wrong = {**good, "head.weight": np.zeros((7, 128), np.float32)}
    with pytest.raises(
        ConfigError,
        match=r"tensor 'head.weight' has shape \[7, 128\], the mlp network needs \[10, 128\]",
    ):
        ModelFile(SPEC, wrong).to_torch()
    other_spec = ModelSpec("mlp", 1, 8, 8, 7)  # the same tensors under a spec they do not fit
    with pytest.raises(ConfigError, match=r"head.weight"):
        ModelFile(other_spec, good).to_torch()
