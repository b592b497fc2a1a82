"""Model zoo and fine-tuning: shapes, parameter groups, what trains, what the delta carries."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from common.delta import DeltaEncoding, apply_delta, encode_delta, stats
from common.errors import ConfigError, DataError
from common.finetune import (
    LowRankAdapter,
    Trainable,
    TrainSettings,
    accuracy,
    clip_weights,
    fine_tuned_update,
    predict,
    prepare,
    train_network,
)
from common.modelfile import ModelFile, from_torch
from common.noise_aware import inject_weight_noise
from common.zoo import (
    ModelSpec,
    build_model,
    flops_per_sample,
    model_state,
    parameter_count,
)
from common.zoo_spec import MODEL_NAMES

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
FAST = TrainSettings(epochs=2, batch_size=16, learning_rate=1e-2, seed=0)
TINY = TrainSettings(epochs=1, batch_size=8, learning_rate=1e-2, seed=0)  # 2 steps on 16 images


def _data(spec: ModelSpec, n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, spec.in_channels, spec.height, spec.width), dtype=np.float32)
    y = rng.integers(0, spec.num_classes, n).astype(np.int64)
    return x, y


def _state(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model_state(net).items()}


# -- zoo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("shape", "classes"), [((1, 8, 8), 10), ((3, 32, 32), 7)])
def test_every_zoo_network_maps_images_to_class_scores(
    name: str, shape: tuple[int, int, int], classes: int
) -> None:
    spec = ModelSpec(name, *shape, classes)
    net = build_model(spec, seed=0).eval()
    with torch.no_grad():
        out = net(torch.rand((3, *shape)))
    assert out.shape == (3, classes) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    # the named groups --trainable selects exist in every network
    assert isinstance(net.head, nn.Linear) and net.head.out_features == classes
    assert any(k.startswith("last_block.") for k in model_state(net))
    assert parameter_count(net) == sum(p.numel() for p in net.parameters())


def test_build_model_is_seeded_without_touching_the_global_rng() -> None:
    spec = ModelSpec("lenet", 1, 8, 8, 10)
    before = torch.random.get_rng_state()
    a, b = _state(build_model(spec, seed=3)), _state(build_model(spec, seed=3))
    assert torch.equal(before, torch.random.get_rng_state())
    c = _state(build_model(spec, seed=4))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)


def test_model_state_holds_bn_statistics_but_no_integer_buffers() -> None:
    net = build_model(ModelSpec("resnet8", 3, 8, 8, 10), seed=0)
    state = model_state(net)
    assert any(k.endswith("running_var") for k in state)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert all(v.is_floating_point() for v in state.values())


def test_flops_per_sample_counts_conv_and_linear_macs() -> None:
    # hand-counted multiply-accumulates of one forward pass
    mlp = build_model(ModelSpec("mlp", 1, 8, 8, 10))
    assert flops_per_sample(mlp, (1, 8, 8)) == 64 * 256 + 256 * 128 + 128 * 10
    lenet = build_model(ModelSpec("lenet", 1, 8, 8, 10))
    conv1 = (32 * 8 * 8) * (1 * 3 * 3)  # 8x8 map, then pooled to 4x4
    conv2 = (64 * 4 * 4) * (32 * 3 * 3)  # 4x4 map: no second pool
    fc = (64 * 4 * 4) * 128 + 128 * 10
    assert flops_per_sample(lenet, (1, 8, 8)) == conv1 + conv2 + fc
    lenet.train()
    flops_per_sample(lenet, (1, 8, 8))
    assert lenet.training  # the mode is restored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "vgg"}, r"model must be one of"),
        ({"in_channels": 0}, r"model.in_channels must be >= 1, got 0"),
        ({"width": 0}, r"model.width must be >= 1, got 0"),
        ({"num_classes": 1}, r"model.num_classes must be >= 2, got 1"),
    ],
)
def test_model_spec_is_checked(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "name": "mlp",
        "in_channels": 1,
        "height": 8,
        "width": 8,
        "num_classes": 10,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**fields)  # type: ignore[arg-type]


def test_model_spec_json_round_trip() -> None:
    spec = ModelSpec("resnet20", 3, 32, 32, 10)
    assert ModelSpec.from_json(spec.to_json()) == spec
    for text in ("", "[]", "{}", '{"name": "mlp", "extra": 1}', "null"):
        with pytest.raises(ConfigError, match=r"not a model spec"):
            ModelSpec.from_json(text)


# -- Trainable -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "rank"),
    [
        ("head", "head", 0),
        ("last-block", "last-block", 0),
        ("bn", "bn", 0),
        ("all", "all", 0),
        ("adapters:4", "adapters", 4),
        (" adapters:1 ", "adapters", 1),
    ],
)
def test_trainable_parse_accepts(text: str, kind: str, rank: int) -> None:
    t = Trainable.parse(text)
    assert (t.kind, t.rank) == (kind, rank)
    assert Trainable.parse(str(t)) == t


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adapters:x", r"trainable 'adapters:x': adapters need an integer rank, e.g. adapters:4"),
        ("adapters", r"adapters need an integer rank"),
        ("adapters:0", r"adapters need a rank >= 1"),
        ("adapters:-2", r"adapters need a rank >= 1"),
        ("head:2", r"trainable 'head:2': only adapters take a ':RANK'"),
        (
            "everything",
            r"trainable must be one of \['head', 'last-block', 'bn', 'all', 'adapters'\]",
        ),
        ("", r"trainable must be one of"),
    ],
)
def test_trainable_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainable.parse(text)


# -- prepare: what trains --------------------------------------------------------------------


def _expected_trainable(net: nn.Module, kind: str) -> set[str]:
    names = [n for n, _ in net.named_parameters()]
    if kind == "all":
        return set(names)
    head = {n for n in names if n.startswith("head.")}
    if kind == "head":
        return head
    if kind == "last-block":
        return head | {n for n in names if n.startswith("last_block.")}
    norm = {
        f"{m}.{p}"
        for m, mod in net.named_modules()
        if isinstance(mod, _NORM)
        for p, _ in mod.named_parameters(recurse=False)
    }
    return head | norm


@pytest.mark.parametrize("kind", ["head", "last-block", "bn", "all"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_prepare_freezes_exactly_the_other_parameters(kind: str, name: str) -> None:
    net = build_model(ModelSpec(name, 1, 8, 8, 10), seed=0)
    if kind == "bn" and name in ("mlp", "lenet"):
        with pytest.raises(ConfigError, match=r"trainable bn: this network has no normalisation"):
            prepare(net, Trainable(kind))
        return
    want = _expected_trainable(net, kind)
    assert want  # the oracle found something
    params = prepare(net, Trainable(kind))
    named = dict(net.named_parameters())
    got = {n for n, p in named.items() if p.requires_grad}
    assert got == want
    assert {id(p) for p in params} == {id(named[n]) for n in want}
    if kind == "bn" and name.startswith("resnet"):  # shortcut projections' BN included
        assert any(".shortcut.1." in n for n in want)
        assert not any(n.endswith("conv1.weight") for n in want)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet8"])
def test_prepare_adapters_trains_head_and_low_rank_factors_only(name: str) -> None:
    spec = ModelSpec(name, 1, 8, 8, 10)
    net = build_model(spec, seed=0).eval()
    x = torch.rand((4, 1, 8, 8))
    with torch.no_grad():
        before = net(x)
    layers = {
        m_name: tuple(m.weight.shape)
        for m_name, m in net.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and not m_name.startswith("head")
    }
    rank = 3
    params = prepare(net, Trainable("adapters", rank))
    adapters = [m for m in net.modules() if isinstance(m, LowRankAdapter)]
    assert len(adapters) == len(layers)
    expected_numel = net.head.weight.numel() + net.head.bias.numel()
    for shape in layers.values():
        rows, cols = shape[0], math.prod(shape[1:])
        r = min(rank, rows, cols)
        expected_numel += rows * r + r * cols
    assert sum(p.numel() for p in params) == expected_numel
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(n.startswith("head.") or n.endswith((".left", ".right")) for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in net.parameters() if p.requires_grad}
    with torch.no_grad():  # B starts at zero: the adapted network computes what the base did
        assert torch.equal(net(x), before)


# -- training and the update it yields --------------------------------------------------------


def test_train_network_is_deterministic_and_checks_its_data() -> None:
    spec = ModelSpec("mlp", 1, 8, 8, 10)
    x, y = _data(spec)
    states = []
    for _ in range(2):
        net = build_model(spec, seed=0)
        result = train_network(net, x, y, Trainable("all"), FAST)
        states.append(_state(net))
    assert result.steps == 2 * math.ceil(32 / 16) and result.epochs == 2
    assert result.trained_params == parameter_count(net)
    assert all(states[0][k].tobytes() == states[1][k].tobytes() for k in states[0])
    with pytest.raises(DataError, match=r"as many labels as images"):
        train_network(build_model(spec), x, y[:-1], Trainable("head"), FAST)
    with pytest.raises(DataError, match=r"got 0 and 0"):
        train_network(build_model(spec), x[:0], y[:0], Trainable("head"), FAST)


def test_max_steps_caps_training() -> None:
    spec = ModelSpec("mlp", 1, 8, 8, 10)
    x, y = _data(spec)
    settings = TrainSettings(epochs=5, batch_size=8, max_steps=4)
    result = train_network(build_model(spec, seed=0), x, y, Trainable("head"), settings)
    assert result.steps == 4 and result.epochs == 1


@pytest.mark.parametrize("noisy", [False, True])
def test_weight_clip_bounds_every_conv_and_linear_weight_after_training(noisy: bool) -> None:
    spec = ModelSpec("lenet", 1, 8, 8, 10)
    x, y = _data(spec)
    net = build_model(spec, seed=0)
    handle = inject_weight_noise(net, "awgn:snr_db=10") if noisy else None
    settings = TrainSettings(epochs=2, batch_size=16, learning_rate=5e-2, weight_clip_sigma=1.5)
    train_network(net, x, y, Trainable("all"), settings)
    if handle is not None:
        handle.remove()
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers
    for layer in layers:
        w = layer.weight.detach()
        # after the last clip: |w| <= 1.5·std (of the tensor before that clip, which is >= std now)
        assert float(w.abs().max()) <= 1.5 * float(w.std()) * 1.1 + 1e-7
    # unclipped training of the same network leaves outliers beyond 1.5 σ (the clip did work)
    free = build_model(spec, seed=0)
    train_network(free, x, y, Trainable("all"), replace(settings, weight_clip_sigma=0.0))
    assert any(
        float(m.weight.detach().abs().max()) > 1.6 * float(m.weight.detach().std())
        for m in free.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )


def test_clip_weights_matches_a_numpy_clip_and_skips_frozen_weights() -> None:
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net[2].weight.requires_grad_(False)
    first = net[0].weight.detach().numpy().copy()
    frozen = net[2].weight.detach().numpy().copy()
    bias = net[0].bias.detach().numpy().copy()
    clip_weights(net, 1.0)
    bound = 1.0 * first.std(ddof=1)
    np.testing.assert_allclose(net[0].weight.detach().numpy(), np.clip(first, -bound, bound))
    assert net[2].weight.detach().numpy().tobytes() == frozen.tobytes()
    assert net[0].bias.detach().numpy().tobytes() == bias.tobytes()


@pytest.mark.parametrize("sigma", [-1.0, math.inf, math.nan])
def test_weight_clip_must_be_finite_and_non_negative(sigma: float) -> None:
    with pytest.raises(ConfigError, match=r"weight_clip_sigma must be a finite number >= 0"):
        TrainSettings(weight_clip_sigma=sigma)


def test_head_training_leaves_every_other_tensor_bit_for_bit() -> None:
    spec = ModelSpec("resnet8", 1, 8, 8, 10)  # BatchNorm statistics must not move either
    net = build_model(spec, seed=0)
    before = _state(net)
    x, y = _data(spec, 16)
    train_network(net, x, y, Trainable("head"), TINY)
    after = _state(net)
    changed = {k for k in before if before[k].tobytes() != after[k].tobytes()}
    assert changed == {"head.weight", "head.bias"}
    dense, low_rank = fine_tuned_update(net, Trainable("head"))
    assert set(dense) == {"head.weight", "head.bias"} and low_rank == {}
    for k, v in dense.items():
        np.testing.assert_array_equal(v, after[k])


@pytest.mark.parametrize(
    ("name", "kind"),
    [("resnet8", "bn"), ("resnet8", "last-block"), ("lenet", "last-block"), ("mlp", "all")],
)
def test_fine_tuned_update_returns_exactly_what_training_changed(name: str, kind: str) -> None:
    spec = ModelSpec(name, 1, 8, 8, 10)
    net = build_model(spec, seed=0)
    before = _state(net)
    x, y = _data(spec, 16)
    train_network(net, x, y, Trainable(kind), TINY)
    after = _state(net)
    changed = {k for k in before if before[k].tobytes() != after[k].tobytes()}
    dense, low_rank = fine_tuned_update(net, Trainable(kind))
    assert low_rank == {}
    # every changed tensor is in the update (BN statistics of trained layers included) ...
    assert changed <= set(dense)
    # ... and the update holds nothing from frozen layers
    trained = _expected_trainable(build_model(spec), kind)
    owners = {n.rsplit(".", 1)[0] for n in trained}
    assert all(k in trained or k.rsplit(".", 1)[0] in owners for k in dense)
    if kind == "bn":
        assert any(k.endswith("running_mean") for k in changed)
        assert not any(k.endswith("conv1.weight") for k in dense)
    for k, v in dense.items():
        np.testing.assert_array_equal(v, after[k])


def test_adapter_delta_reproduces_the_adapted_network() -> None:
    spec = ModelSpec("lenet", 1, 8, 8, 10)
    net = build_model(spec, seed=0)
    base = from_torch(spec, net)
    x, y = _data(spec)
    train_network(net, x, y, Trainable("adapters", 2), FAST)
    dense, low_rank = fine_tuned_update(net, Trainable("adapters", 2))
    assert set(dense) == {"head.weight", "head.bias"}
    assert set(low_rank) == {
        "features.0.weight",
        "features.3.weight",
        "last_block.0.weight",
    }
    for left, right in low_rank.values():
        assert np.any(left != 0)  # training moved B away from zero
        assert left.shape[1] == right.shape[0] == 2
    entries = encode_delta(base.tensors, dense, DeltaEncoding("float32"), low_rank)
    assert stats(entries).params == sum(v.size for v in dense.values()) + sum(
        a.size + b.size for a, b in low_rank.values()
    )
    # frozen base tensors (biases of adapted layers) are not in the update
    assert "features.0.bias" not in dense
    tuned = ModelFile(spec, apply_delta(base.tensors, entries)).to_torch()
    xt = torch.from_numpy(_data(spec, 16, seed=1)[0])
    net.eval()
    with torch.no_grad():
        want, got = net(xt), tuned(xt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.to_torch()(xt), want, atol=1e-4)  # the adapters did something


def test_head_delta_applied_to_the_base_reproduces_the_fine_tuned_network() -> None:
    spec = ModelSpec("mlp", 1, 8, 8, 10)
    net = build_model(spec, seed=0)
    base = from_torch(spec, net)
    x, y = _data(spec)
    train_network(net, x, y, Trainable("head"), FAST)
    dense, low_rank = fine_tuned_update(net, Trainable("head"))
    entries = encode_delta(base.tensors, dense, DeltaEncoding("float32"), low_rank)
    assert stats(entries).params == 10 * 128 + 10
    tuned = ModelFile(spec, apply_delta(base.tensors, entries)).to_torch()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        torch.testing.assert_close(tuned(xt), net.eval()(xt), rtol=1e-5, atol=1e-6)


def test_predict_and_accuracy_match_a_plain_argmax() -> None:
    spec = ModelSpec("mlp", 1, 8, 8, 10)
    net = build_model(spec, seed=0)
    x, y = _data(spec, 100)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(predict(net, x, batch_size=7), want)
    assert accuracy(net, x, y) == pytest.approx(float(np.mean(want == y)))
    assert accuracy(net, x[:0], y[:0]) == 0.0
