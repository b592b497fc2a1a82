"""Transfer learning as users run it: pretrain, server --base-model, edge --mode finetune."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from common.datasets import filter_classes, load_dataset
from common.modelfile import read_model_file
from common.zoo import ModelSpec, parameter_count
from edge.uplink import RetryPolicy, UplinkClient
from tests.conftest import (
    ServerProcess,
    assert_one_line_error,
    run_cli,
    start_server_process,
)

pytestmark = pytest.mark.e2e

SOURCE = "0,1,2,3,4"
TARGET = "5,6,7,8,9"


@dataclass
class Pretrained:
    proc: subprocess.CompletedProcess[str]
    out: Path
    onnx: Path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """`latentedge pretrain` of lenet on the digits 0-4 (the source task), 3 epochs."""
    folder = tmp_path_factory.mktemp("pretrain")
    out, onnx_path = folder / "base.safetensors", folder / "base.onnx"
    proc = run_cli(
        "pretrain",
        "--data",
        "digits",
        "--classes",
        SOURCE,
        "--model",
        "lenet",
        "--epochs",
        "3",
        "--threads",
        "1",
        "--out",
        str(out),
        "--onnx",
        str(onnx_path),
    )
    return Pretrained(proc, out, onnx_path)


@pytest.fixture(scope="module")
def base_server(
    pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    assert pretrained.proc.returncode == 0, pretrained.proc.stderr[-3000:]
    db = tmp_path_factory.mktemp("server") / "s.db"
    server = start_server_process(db, "--base-model", str(pretrained.out))
    yield server
    server.stop()


def test_pretrain_writes_model_file_report_and_onnx(pretrained: Pretrained) -> None:
    proc = pretrained.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = pretrained.out.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert f"wrote {pretrained.out} (sha256 {digest})" in proc.stdout
    assert f"wrote {pretrained.onnx}" in proc.stdout
    report = json.loads(pretrained.out.with_suffix(".json").read_text())
    source = filter_classes(load_dataset("digits"), [0, 1, 2, 3, 4])
    assert report["hash"] == digest and report["out"] == str(pretrained.out)
    assert report["model"] == "lenet" and report["epochs"] == 3
    assert report["train_samples"] == len(source.y_train)
    assert report["test_samples"] == len(source.y_test)
    assert report["spec"] == {
        "name": "lenet",
        "in_channels": 1,
        "height": 8,
        "width": 8,
        "num_classes": 10,  # the head keeps every class's output
        "norm": "",  # the network's default (none for lenet)
    }
    model, read_digest = read_model_file(pretrained.out)
    assert read_digest == digest
    assert model.spec == ModelSpec("lenet", 1, 8, 8, 10)
    assert model.meta["source_classes"] == SOURCE
    net = model.to_torch()
    assert report["parameters"] == parameter_count(net)
    # the reported accuracy is the model file's accuracy on the source test split
    with torch.no_grad():
        pred = net(torch.from_numpy(source.x_test)).argmax(1).numpy()
    assert report["test_accuracy"] == pytest.approx(float(np.mean(pred == source.y_test)))
    assert report["test_accuracy"] > 0.8  # 5 classes, far above chance (0.2)
    assert f"test accuracy {report['test_accuracy']:.4f}" in proc.stdout
    # the ONNX export computes what the model file computes
    graph = onnx.load(str(pretrained.onnx))
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(str(pretrained.onnx), providers=["CPUExecutionProvider"])
    x = source.x_test[:32]
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)
    assert report["onnx_max_abs_diff"] < 1e-4


def test_edge_finetune_against_the_served_base(
    pretrained: Pretrained, base_server: ServerProcess, tmp_path: Path
) -> None:
    cache, report_path = tmp_path / "cache", tmp_path / "n0.json"
    proc = run_cli(
        "edge",
        "--server",
        base_server.address,
        "--node-id",
        "n0",
        "--data",
        "digits",
        "--classes",
        TARGET,
        "--mode",
        "finetune",
        "--trainable",
        "head",
        "--delta-encoding",
        "fp16",
        "--finetune-epochs",
        "10",
        "--model-cache",
        str(cache),
        "--report",
        str(report_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    target = filter_classes(load_dataset("digits"), [5, 6, 7, 8, 9])
    head = 128 * 10 + 10
    assert report["mode"] == "finetune" and report["trainable"] == "head"
    assert report["delta_encoding"] == "fp16"
    assert report["samples"] == len(target.y_train)
    assert report["test_samples"] == len(target.y_test)
    assert report["delta_params"] == head and report["delta_tensors"] == 2
    assert report["delta_bytes"] == 2 * head and report["delta_index_bytes"] == 0
    assert report["uploaded_params_fraction"] == pytest.approx(head / report["model_params"])
    base, digest = read_model_file(pretrained.out)
    assert report["model_params"] == parameter_count(base.to_torch())
    assert report["base_hash"] == digest and report["base_version"] == 1
    # the base never saw 5-9: its accuracy there is near zero; the fine-tuned head fixes that
    assert report["base_accuracy"] < 0.2
    assert report["accuracy"] > max(0.6, report["base_accuracy"] + 0.4)
    assert report["correct"] == round(report["accuracy"] * len(target.y_test))
    summary = (
        rf"node n0: fine-tuned head of lenet on {len(target.y_train)} samples; delta {head} "
        rf"parameters \([0-9.]+% of the model\), {2 * head} bytes \(fp16\); test accuracy "
        rf"{report['accuracy']:.4f} \(base model {report['base_accuracy']:.4f}\) on "
        rf"{len(target.y_test)} samples"
    )
    assert re.search(summary, proc.stdout), proc.stdout
    # the base is cached by its hash; the node's fine-tuned model beside it
    assert (cache / f"{digest}.safetensors").read_bytes() == pretrained.out.read_bytes()
    assert not list(cache.glob("*.part"))
    with UplinkClient(base_server.address, retry=RetryPolicy(window_s=5)) as client:
        node = next(n for n in client.status().nodes if n.node_id == "n0")
    assert (node.deltas, node.delta_bytes, node.delta_base_version) == (1, 2 * head, 1)


def test_trainable_bn_on_lenet_exits_3(base_server: ServerProcess, tmp_path: Path) -> None:
    proc = run_cli(
        "edge",
        "--server",
        base_server.address,
        "--node-id",
        "n1",
        "--data",
        "digits",
        "--mode",
        "finetune",
        "--trainable",
        "bn",
        "--finetune-epochs",
        "1",
        "--model-cache",
        str(tmp_path / "cache"),
    )
    assert_one_line_error(proc, 3, "trainable bn: this network has no normalisation layers")


def test_bad_delta_encoding_flag_exits_3(tmp_path: Path) -> None:
    # (the other flag checks, e.g. --trainable adapters:x, are unit tests of the same parsers;
    # this one proves the CLI maps them to exit code 3 with one precise line)
    proc = run_cli(
        "edge",
        "--server",
        "127.0.0.1:1",  # never reached: the flag is refused first
        "--node-id",
        "n0",
        "--data",
        "digits",
        "--mode",
        "finetune",
        "--retry-window-s",
        "0",
        "--model-cache",
        str(tmp_path / "cache"),
        "--delta-encoding",
        "topk:2",
    )
    assert_one_line_error(proc, 3, "delta encoding 'topk:2': FRACTION must be in (0, 1], got 2.0")
    assert not (tmp_path / "cache").exists()


def test_finetune_against_a_server_without_base_model_exits_4(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    proc = run_cli(
        "edge",
        "--server",
        server_process.address,
        "--node-id",
        "n0",
        "--data",
        "digits",
        "--mode",
        "finetune",
        "--model-cache",
        str(tmp_path / "cache"),
    )
    assert_one_line_error(proc, 4, "--base-model")
    assert "NOT_FOUND" in proc.stderr


def test_models_cli_lists_aggregates_and_downloads(
    pretrained: Pretrained, base_server: ServerProcess, tmp_path: Path
) -> None:
    # a delta from a second node (top-k: sparse fine-tuning), then aggregate and fetch
    proc = run_cli(
        "edge",
        "--server",
        base_server.address,
        "--node-id",
        "n-models",
        "--data",
        "digits",
        "--classes",
        TARGET,
        "--mode",
        "finetune",
        "--delta-encoding",
        "topk:0.5+int8",
        "--finetune-epochs",
        "5",
        "--model-cache",
        str(tmp_path / "cache"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = run_cli("models", "--server", base_server.address)
    assert listed.returncode == 0, listed.stderr[-3000:]
    doc = json.loads(listed.stdout)
    _, digest = read_model_file(pretrained.out)
    assert doc["models"][0]["version"] == 1 and doc["models"][0]["hash"] == digest
    assert doc["deltas"]["n-models"]["deltas"] == 1
    made = run_cli("models", "--server", base_server.address, "--aggregate")
    assert made.returncode == 0, made.stderr[-3000:]
    version = json.loads(made.stdout)
    assert version["parent_version"] == 1 and "n-models" in version["nodes"]
    out, onnx_path = tmp_path / "n.safetensors", tmp_path / "n.onnx"
    got = run_cli(
        "models",
        "--server",
        base_server.address,
        "--fine-tuned",
        "n-models",
        "--out",
        str(out),
        "--onnx",
        str(onnx_path),
    )
    assert got.returncode == 0, got.stderr[-3000:]
    model, tuned_digest = read_model_file(out)
    assert tuned_digest in got.stdout
    # only the head moved, and only half of its entries (top-k 0.5 after sparse fine-tuning)
    base, _ = read_model_file(pretrained.out)
    changed = {k for k in base.tensors if not np.array_equal(base.tensors[k], model.tensors[k])}
    assert changed <= {"head.weight", "head.bias"}
    moved = sum(int(np.count_nonzero(base.tensors[k] != model.tensors[k])) for k in changed)
    assert 0 < moved <= (128 * 10 + 10 + 1) // 2
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.to_torch()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, atol=1e-4)
    missing = run_cli("models", "--server", base_server.address, "--get", "99", "--out", str(out))
    assert_one_line_error(missing, 4, "base version 99 does not exist")


def test_demo_transfer_on_digits_meets_targets(tmp_path: Path) -> None:
    proc = run_cli("demo", "--mode", "transfer", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "mode",
        "base_accuracy",
        "accuracy",
        "baseline_accuracy",
        "uploaded_params_fraction",
        "delta_bytes",
        "model_bytes",
        "aggregated_accuracy",
        "per_node",
        "seconds",
    ):
        assert key in summary
    assert summary["mode"] == "transfer" and len(summary["per_node"]) == 3
    # the targets: >= 95 % of the baseline at <= 1 % of the parameters, >= 5 points
    # above the pre-trained model (the target task differs from the source)
    assert summary["accuracy"] >= 0.95 * summary["baseline_accuracy"]
    assert summary["uploaded_params_fraction"] <= 0.01
    assert summary["accuracy"] >= summary["base_accuracy"] + 0.05
    head = 128 * 10 + 10
    assert summary["delta_bytes"] == 3 * (head + 2 * 4)  # int8 values + one scale per tensor
    assert summary["model_bytes"] == (tmp_path / "base.safetensors").stat().st_size
    assert [v["source"] for v in summary["model_versions"]][1] == "aggregate"
    assert summary["aggregated_version"] == 2
    for node in summary["per_node"].values():
        assert node["onnx_max_abs_diff"] < 1e-3
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert "of the baseline" in proc.stdout
