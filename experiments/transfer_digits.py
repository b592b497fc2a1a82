"""Transfer learning on digits: accuracy vs fraction of parameters uploaded, over seeds.

The same split as ``latentedge demo --mode transfer``: a seeded half of the training images is
the server's (it pre-trains on classes 0-7 of it), the other half is the nodes' (all classes,
3 non-IID shards, skew 0.5). For each seed and each (trainable, encoding) the nodes fine-tune,
the delta is encoded (``edge.transfer.fine_tune_delta``: what an edge node runs, sparse
fine-tuning behind top-k), applied to the base exactly as the server does, and the model is
scored on each node's test shard (pooled). The baseline is the same network trained centrally
on the nodes' raw data. In-process (no gRPC: the demo and the tests cover the wire), CPU.

    python experiments/transfer_digits.py --seeds 0 1 2 3 4 --out docs/transfer_digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common.datasets import Dataset, filter_classes, halve_train, load_dataset, shard
from common.delta import DeltaEncoding, apply_delta, stats
from common.finetune import Trainable, TrainSettings, accuracy, train_network
from common.modelfile import ModelFile, from_torch
from common.zoo import ModelSpec, build_model, parameter_count
from edge.transfer import FinetuneConfig, fine_tune_delta

GRID: list[tuple[str, str]] = [
    ("head", "fp32"),
    ("head", "fp16"),
    ("head", "int8"),
    ("head", "topk:0.1+int8"),
    ("adapters:1", "int8"),
    ("adapters:4", "int8"),
    ("last-block", "int8"),
    ("last-block", "topk:0.01+int8"),
    ("all", "int8"),
    ("all", "topk:0.01+int8"),
    ("all", "topk:0.1+int8"),
]


def split(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    source, target = halve_train(data, seed)  # the demo's split
    return filter_classes(source, range(8)), target


def run_seed(seed: int, pretrain_epochs: int, nodes: int) -> dict[str, object]:
    data = load_dataset("digits")
    source, target = split(data, seed)
    spec = ModelSpec("lenet", *data.input_shape, data.num_classes)
    pre = TrainSettings(epochs=pretrain_epochs, seed=seed, augment=True, hflip=False)
    net = build_model(spec, seed=seed)
    train_network(net, source.x_train, source.y_train, Trainable("all"), pre)
    base = from_torch(spec, net)
    baseline = build_model(spec, seed=seed + 1)
    train_network(baseline, target.x_train, target.y_train, Trainable("all"), pre)
    shards = [shard(target, i, nodes, skew=0.5, seed=seed) for i in range(nodes)]
    tested = sum(len(s.y_test) for s in shards)

    def pooled(models: list[torch.nn.Module]) -> float:
        return (
            sum(
                accuracy(m, s.x_test, s.y_test) * len(s.y_test)
                for m, s in zip(models, shards, strict=True)
            )
            / tested
        )

    row: dict[str, object] = {
        "seed": seed,
        "params": parameter_count(net),
        "base_accuracy": pooled([base.to_torch()] * nodes),
        "baseline_accuracy": pooled([baseline] * nodes),
        "runs": [],
    }
    for trainable_text, encoding_text in GRID:
        config = FinetuneConfig(
            trainable=Trainable.parse(trainable_text),
            encoding=DeltaEncoding.parse(encoding_text),
            seed=seed,
        )
        models, params, nbytes, index_bytes = [], 0, 0, 0
        started = time.perf_counter()
        for node in shards:
            entries = fine_tune_delta(base, node.x_train, node.y_train, config).entries
            st = stats(entries)
            params += st.params
            nbytes += st.payload_bytes
            index_bytes += st.index_bytes
            models.append(ModelFile(spec, apply_delta(base.tensors, entries)).to_torch())
        acc = pooled(models)
        row["runs"].append(  # type: ignore[union-attr]
            {
                "trainable": trainable_text,
                "encoding": encoding_text,
                "accuracy": acc,
                "ratio": acc / float(row["baseline_accuracy"]),  # type: ignore[arg-type]
                "params_fraction": params / nodes / parameter_count(net),
                "delta_bytes_per_node": nbytes / nodes,
                "index_bytes_per_node": index_bytes / nodes,
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"seed {seed} {trainable_text:12s} {encoding_text:16s} acc {acc:.4f} "
            f"frac {params / nodes / parameter_count(net):.4%} bytes {nbytes / nodes:,.0f}",
            flush=True,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=60)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/transfer_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_seed(s, args.pretrain_epochs, args.nodes) for s in args.seeds]
    table = []
    for i, (trainable, encoding) in enumerate(GRID):
        runs = [r["runs"][i] for r in rows]  # type: ignore[index]
        acc = [float(r["accuracy"]) for r in runs]
        ratio = [float(r["ratio"]) for r in runs]
        table.append(
            {
                "trainable": trainable,
                "encoding": encoding,
                "params_fraction": statistics.mean(float(r["params_fraction"]) for r in runs),
                "delta_bytes_per_node": statistics.mean(
                    float(r["delta_bytes_per_node"]) for r in runs
                ),
                "accuracy_mean": statistics.mean(acc),
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
                "ratio_mean": statistics.mean(ratio),
                "ratio_min": min(ratio),
            }
        )
    base = [float(r["base_accuracy"]) for r in rows]  # type: ignore[arg-type]
    baseline = [float(r["baseline_accuracy"]) for r in rows]  # type: ignore[arg-type]
    doc = {
        "seeds": args.seeds,
        "base_accuracy": {"mean": statistics.mean(base), "min": min(base), "max": max(base)},
        "baseline_accuracy": {
            "mean": statistics.mean(baseline),
            "min": min(baseline),
            "max": max(baseline),
        },
        "table": table,
        "per_seed": rows,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"base {statistics.mean(base):.4f}, baseline {statistics.mean(baseline):.4f}")
    for t in table:
        print(
            f"{t['trainable']:12s} {t['encoding']:16s} frac {t['params_fraction']:.4%} "
            f"bytes {t['delta_bytes_per_node']:>9,.0f} acc {t['accuracy_mean']:.4f} "
            f"[{t['accuracy_min']:.4f}, {t['accuracy_max']:.4f}] ratio {t['ratio_mean']:.3f} "
            f"(min {t['ratio_min']:.3f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
