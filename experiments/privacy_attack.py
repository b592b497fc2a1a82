"""How much of a node's images can the server rebuild from the latents it receives?

One MNIST edge node trains the project's autoencoder (``edge.trainer.train_autoencoder``, the
``latentedge edge`` defaults: seed 0, 3000 steps) on its images, optionally perturbs the
latents with ``edge.privacy.LatentNoise`` (``latentedge edge --latent-noise``), and sends them
through the wire encoding (``common.tensors.to_wire``/``from_wire``, chunked as
``UplinkClient.push_latents`` does) with their labels. The server is the attacker. It holds what
it receives (the node's latents and labels), a public labelled image set of the same kind
(MNIST training images the node never had) and knows the node's encoder architecture and
latent size (both are the open-source defaults; the size is sent at registration), not its
weights. It trains a *shadow* autoencoder of that architecture on the public images, then:

* ``unpaired``: no (image, latent) pair of the node at all. Fits an affine map from the node's
  latent space to the shadow latent space by matching the first two moments of every class
  (labels are uploaded), then decodes with the shadow decoder. Knowing the mechanism (Kerckhoffs)
  it removes the calibrated noise's covariance from the class statistics and denoises each latent
  with the class-conditional linear MMSE estimator before mapping it.
* ``paired-K``: K leaked (image, received latent) pairs of the node (a breach, a camera also
  seen by the public, a known test pattern). Ridge regression (penalty by leave-one-out) from
  received latents to the shadow latents of the leaked images, then the shadow decoder.
* references: ``prototype`` (every image reconstructed as the public mean image of its label,
  which the server gets for free from the labels), ``naive`` (shadow decoder on per-dimension
  standardised latents, no alignment) and ``node-decoder`` (the node's own decoder: not an attack,
  what the latents contain for their owner).

Measured on 2000 of the node's uploaded images the attacker never had as pairs: PSNR, SSIM
(Gaussian 11x11 window, sigma 1.5, Wang et al. 2004), accuracy of an independent CNN trained on
the public images when applied to the reconstructions, and re-identification: the share of
reconstructions whose nearest image (MSE) among all evaluated node images of the same class is
the true one (a prototype scores chance, about 1/200). Utility: accuracy of the server's
per-node classifier (``server.classifier.train_classifier``, what ``latentedge server`` trains)
on the node's test latents, perturbed and encoded the same way.

    .venv/bin/python experiments/privacy_attack.py            # ~10 min on 1 core: docs/privacy.*
    .venv/bin/python experiments/privacy_attack.py --quick    # smoke test, < 1 min, runs/privacy/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.constants import CHUNK_BYTES
from common.datasets import load_dataset
from common.models import AutoencoderConfig, ClassifierConfig, ConvAutoencoder, compression_ratio
from common.tensors import from_wire, to_wire
from edge.privacy import LatentNoise, LatentNoiseConfig
from edge.trainer import TrainConfig, encode, train_autoencoder
from edge.uplink import label_dtype_for
from server.classifier import ClassifierMode, train_classifier

logger = logging.getLogger("privacy_attack")

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
ATTACKS = ("node-decoder", "paired", "unpaired", "naive", "prototype")


@dataclass(frozen=True)
class Setup:
    """What one run measures (the defaults are the documented run)."""

    node_train: int = 5000
    """Node images: MNIST train[0:node_train]; the last ``evaluated`` are the attack targets."""
    node_test: int = 2000
    """Node test images (server classifier accuracy): MNIST test[0:node_test]."""
    public_start: int = 30000
    """First MNIST training image of the server's public set (disjoint from the node's)."""
    public: int = 10000
    """Size of the public set."""
    evaluated: int = 2000
    """Node images the reconstructions are scored on (never among the leaked pairs)."""
    latent_dims: tuple[int, ...] = (98, 49, 24, 12)
    """Compression ratios 8, 16, 32.7, 65.3 on 28x28 images."""
    dtypes: tuple[str, ...] = ("float32", "float16", "int8")
    """Wire encodings of the latents."""
    noise_dim: int = 49
    """Latent size of the defence sweep."""
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
    """``--latent-noise`` values of the defence sweep (float32 on the wire)."""
    other_channels: tuple[int, ...] = (32, 64)
    """Conv channels of a second shadow autoencoder whose architecture differs from the node's
    (the node uses ``AutoencoderConfig().channels``), tried at ``noise_dim`` without noise."""
    pairs: int = 100
    """Leaked pairs of the ``paired`` attack in the tables."""
    pairs_sweep: tuple[int, ...] = (10, 25, 50, 100, 500)
    """Leaked-pair counts tried at ``noise_dim``, no noise."""
    ae_steps: int = 3000
    """Autoencoder optimiser steps (node and shadow): ``TrainConfig().max_steps``."""
    classifier_epochs: int = 60
    """Server classifier epochs: ``ClassifierConfig().epochs``."""
    cnn_epochs: int = 3
    """Epochs of the independent evaluation CNN on the public images."""
    moment_steps: int = 2000
    """Adam steps of the unpaired moment matching."""
    seed: int = 0
    """Node seed (the CLI default); the shadow uses seed + 1, the noise seed + 2."""


QUICK = Setup(
    node_train=900,
    node_test=300,
    public=1500,
    evaluated=300,
    latent_dims=(49,),
    dtypes=("float32", "int8"),
    noise_levels=(0.0, 1.0),
    other_channels=(8, 16),
    pairs_sweep=(100,),
    ae_steps=150,
    classifier_epochs=5,
    cnn_epochs=3,
    moment_steps=300,
)


# ----------------------------------------------------------------------------- metrics


def psnr(recon: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = np.mean((recon.astype(np.float64) - ref) ** 2, axis=tuple(range(1, ref.ndim)))
    return np.asarray(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))


def ssim(recon: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-image mean SSIM (Wang et al. 2004): Gaussian window sigma 1.5 truncated to 11x11,
    K1 0.01, K2 0.03, data range 1, averaged over channels and the pixels whose window fits."""
    a = recon.astype(np.float64).reshape(-1, *ref.shape[-2:])
    b = ref.astype(np.float64).reshape(-1, *ref.shape[-2:])

    def blur(z: np.ndarray) -> np.ndarray:
        return np.asarray(gaussian_filter(z, sigma=(0, 1.5, 1.5), truncate=3.5, mode="reflect"))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    per_plane = s[:, 5:-5, 5:-5].mean(axis=(1, 2))
    return np.asarray(per_plane.reshape(len(ref), -1).mean(axis=1))


def reidentification(recon: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> float:
    """Share of reconstructions whose nearest (MSE) same-class reference image is their own."""
    hits = 0
    flat_r = recon.reshape(len(recon), -1).astype(np.float64)
    flat_x = ref.reshape(len(ref), -1).astype(np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        d = (
            (flat_r[idx] ** 2).sum(1)[:, None]
            - 2 * flat_r[idx] @ flat_x[idx].T
            + (flat_x[idx] ** 2).sum(1)[None, :]
        )
        hits += int(np.sum(np.argmin(d, axis=1) == np.arange(len(idx))))
    return hits / len(labels)


def train_cnn(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    """A small CNN on (public) images: the independent judge of the reconstructions."""
    c, h, w = x.shape[1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), 64),
            nn.ReLU(),
            nn.Linear(64, int(y.max()) + 1),
        )
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data, targets = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            torch.autograd.backward(nn.functional.cross_entropy(net(data[idx]), targets[idx]))
            opt.step()
    return net.eval()


def cnn_accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(1)
    return float(np.mean(pred.numpy() == y))


# ----------------------------------------------------------------------------- the wire


def over_the_wire(latents: np.ndarray, encoding: str, num_classes: int) -> np.ndarray:
    """What the server decodes: chunked like ``UplinkClient.push_latents`` (int8: one scale per
    chunk), encoded with ``to_wire`` and decoded with ``from_wire``."""
    per_row = latents.shape[1] * 4 + label_dtype_for(num_classes).itemsize
    rows = max(1, CHUNK_BYTES // per_row)
    parts = [
        from_wire(to_wire(latents[i : i + rows], encoding)).astype(np.float32)
        for i in range(0, len(latents), rows)
    ]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- the attacks


def decode(model: ConvAutoencoder, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.decoder(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)))
    return np.asarray(out.numpy())


@dataclass(frozen=True)
class Shadow:
    """The attacker's autoencoder on the public images and its latent statistics."""

    model: ConvAutoencoder
    latents: np.ndarray
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def decode_standardised(self, v: np.ndarray) -> np.ndarray:
        return decode(self.model, v * self.std + self.mean)

    def standardise(self, z: np.ndarray) -> np.ndarray:
        return np.asarray((z - self.mean) / self.std)


def standardised(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = z.mean(axis=0)
    std = np.maximum(z.std(axis=0), 1e-6)
    return (z - mean) / std, mean, std


def ridge_loo(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Affine ridge map ``x -> t`` (rows are samples); the penalty minimises the leave-one-out
    error over a log grid. Returns ``W`` with ``[x, 1] @ W`` the prediction."""
    xm, tm = x.mean(0), t.mean(0)
    xc, tc = x - xm, t - tm
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    ut_t = u.T @ tc
    best: tuple[float, np.ndarray] | None = None
    for lam in np.logspace(-3, 3, 25) * len(x) / max(1, x.shape[1]):
        f = s**2 / (s**2 + lam)
        fitted = u @ (f[:, None] * ut_t)
        hat = (u**2) @ f + 1.0 / len(x)  # + the intercept's leverage
        loo = ((tc - fitted) / (1 - hat)[:, None]) ** 2
        err = float(loo.sum())
        if best is None or err < best[0]:
            coef = vt.T @ ((s / (s**2 + lam))[:, None] * ut_t)
            best = (err, np.vstack([coef, tm - xm @ coef]))
    assert best is not None
    return best[1]


def paired_attack(
    shadow: Shadow, received: np.ndarray, leaked_images: np.ndarray, leaked: slice
) -> np.ndarray:
    """Reconstructions of all ``received`` latents from the pairs ``received[leaked]``."""
    target = shadow.standardise(encode(shadow.model, leaked_images))
    w = ridge_loo(received[leaked], target)
    return shadow.decode_standardised(np.c_[received, np.ones(len(received))] @ w)


def _psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return np.asarray((v * np.maximum(w, 0.0)) @ v.T)


def unpaired_attack(
    shadow: Shadow,
    received: np.ndarray,
    labels: np.ndarray,
    noise_std: float,
    steps: int,
    seed: int,
) -> np.ndarray:
    """Reconstructions from latents + labels + public data only (class-moment matching)."""
    u, _, _ = standardised(received.astype(np.float64))
    v = shadow.standardise(shadow.latents.astype(np.float64))
    classes = np.unique(labels)
    # in the node's standardised coordinates the calibrated noise has variance r on every axis
    r = noise_std**2 / (1 + noise_std**2)
    mu, s_noisy, s_clean, nu, tcov = [], [], [], [], []
    for c in classes:
        uc, vc = u[labels == c], v[shadow.labels == c]
        mu.append(uc.mean(0))
        cov = np.cov(uc.T)
        s_noisy.append(cov)
        s_clean.append(_psd(cov - r * np.eye(len(cov))))
        nu.append(vc.mean(0))
        tcov.append(np.cov(vc.T))
    mu_a, nu_a = np.array(mu), np.array(nu)
    init = np.linalg.lstsq(np.c_[mu_a, np.ones(len(mu_a))], nu_a, rcond=None)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        a = torch.tensor(init[:-1].T.copy(), requires_grad=True)
        b = torch.tensor(init[-1].copy(), requires_grad=True)
    m_s, m_t = torch.tensor(mu_a), torch.tensor(nu_a)
    c_s, c_t = torch.tensor(np.array(s_clean)), torch.tensor(np.array(tcov))
    norm_m, norm_c = float((m_t**2).sum()), float((c_t**2).sum())
    opt = torch.optim.Adam([a, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((m_s @ a.T + b - m_t) ** 2).sum() / norm_m
        loss = loss + ((a @ c_s @ a.T - c_t) ** 2).sum() / norm_c
        torch.autograd.backward(loss)
        opt.step()
    a_np, b_np = a.detach().numpy(), b.detach().numpy()
    out = np.empty_like(u)
    for k, c in enumerate(classes):
        sel = labels == c
        # class-conditional linear MMSE estimate of the clean latent (identity without noise)
        gain = s_clean[k] @ np.linalg.pinv(s_noisy[k]) if r > 0 else np.eye(u.shape[1])
        out[sel] = mu[k] + (u[sel] - mu[k]) @ gain.T
    return shadow.decode_standardised(out @ a_np.T + b_np)


# ----------------------------------------------------------------------------- one setting


@dataclass(frozen=True)
class Data:
    x_node: np.ndarray
    y_node: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_pub: np.ndarray
    y_pub: np.ndarray
    num_classes: int


def evaluate(
    name: str, recon: np.ndarray, data: Data, ev: slice, cnn: nn.Module
) -> dict[str, float]:
    x, y = data.x_node[ev], data.y_node[ev]
    r = recon[ev] if len(recon) == len(data.x_node) else recon
    row = {
        "psnr_db": float(np.mean(psnr(r, x))),
        "ssim": float(np.mean(ssim(r, x))),
        "cnn_accuracy": cnn_accuracy(cnn, r, y),
        "reidentification": reidentification(r, x, y),
    }
    logger.info(
        "  %-14s PSNR %5.2f dB  SSIM %.3f  CNN %.3f  re-id %.3f",
        name,
        row["psnr_db"],
        row["ssim"],
        row["cnn_accuracy"],
        row["reidentification"],
    )
    return row


def server_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, setup: Setup
) -> float:
    config = replace(ClassifierConfig(), epochs=setup.classifier_epochs)
    clf = train_classifier(
        {"node": (train, y_train)}, 10, ClassifierMode.PER_NODE, config, seed=setup.seed
    )
    predicted, _ = clf.predict("node", test)
    return float(np.mean(predicted == y_test))


def run_setting(
    *,
    setup: Setup,
    data: Data,
    node: ConvAutoencoder,
    shadow: Shadow,
    cnn: nn.Module,
    dtype: str,
    noise_std: float,
    pairs: tuple[int, ...],
    references: bool = True,
) -> dict[str, Any]:
    """Perturb, send, attack and score one (latent size, dtype, noise) setting; without
    ``references`` only the attacks that use the shadow (paired, unpaired)."""
    clean_train = encode(node, data.x_node)
    noise = LatentNoise(LatentNoiseConfig(noise_std, seed=setup.seed + 2), clean_train)
    received = over_the_wire(noise(clean_train), dtype, data.num_classes)
    received_test = over_the_wire(noise(encode(node, data.x_test)), dtype, data.num_classes)
    ev = slice(len(data.x_node) - setup.evaluated, len(data.x_node))
    row: dict[str, Any] = {
        "latent_dim": node.config.latent_dim,
        "compression_ratio": compression_ratio(node.config),
        "dtype": dtype,
        "noise_std": noise_std,
        "shadow": "same-architecture" if references else "other-architecture",
        "shadow_channels": list(shadow.model.config.channels),
        "bytes_per_sample": len(to_wire(received[:1], dtype).data),
        "server_accuracy": server_accuracy(
            received, data.y_node, received_test, data.y_test, setup
        ),
        "attacks": {},
    }
    logger.info(
        "latent %d %s noise %.3g: server classifier accuracy %.4f",
        node.config.latent_dim,
        dtype,
        noise_std,
        row["server_accuracy"],
    )
    attacks: dict[str, dict[str, float]] = row["attacks"]
    if references:
        attacks["node-decoder"] = evaluate(
            "node-decoder", decode(node, received[ev]), data, ev, cnn
        )
    for k in pairs:
        name = "paired" if k == setup.pairs else f"paired-{k}"
        recon = paired_attack(shadow, received, data.x_node[:k], slice(0, k))
        attacks[name] = evaluate(name, recon, data, ev, cnn)
    if setup.pairs not in pairs:
        recon = paired_attack(shadow, received, data.x_node[: setup.pairs], slice(0, setup.pairs))
        attacks["paired"] = evaluate("paired", recon, data, ev, cnn)
    recon = unpaired_attack(
        shadow, received, data.y_node, noise_std, setup.moment_steps, setup.seed
    )
    attacks["unpaired"] = evaluate("unpaired", recon, data, ev, cnn)
    if not references:
        return row
    u, _, _ = standardised(received)
    attacks["naive"] = evaluate("naive", shadow.decode_standardised(u[ev]), data, ev, cnn)
    prototypes = np.stack([data.x_pub[data.y_pub == c].mean(0) for c in range(data.num_classes)])
    attacks["prototype"] = evaluate("prototype", prototypes[data.y_node[ev]], data, ev, cnn)
    return row


# ----------------------------------------------------------------------------- the run


def load(setup: Setup, path: Path) -> Data:
    ds = load_dataset(str(path))
    pub = slice(setup.public_start, setup.public_start + setup.public)
    if setup.node_train > setup.public_start or pub.stop > len(ds.x_train):
        raise SystemExit("the node's and the public images must be disjoint parts of x_train")
    if max(setup.pairs, *setup.pairs_sweep) > setup.node_train - setup.evaluated:
        raise SystemExit("leaked pairs must not overlap the evaluated images")
    return Data(
        x_node=ds.x_train[: setup.node_train],
        y_node=ds.y_train[: setup.node_train],
        x_test=ds.x_test[: setup.node_test],
        y_test=ds.y_test[: setup.node_test],
        x_pub=ds.x_train[pub],
        y_pub=ds.y_train[pub],
        num_classes=ds.num_classes,
    )


def make_shadow(data: Data, ae: AutoencoderConfig, train: TrainConfig) -> Shadow:
    """The attacker's autoencoder, trained on the public images."""
    model = train_autoencoder(data.x_pub, ae, train)
    latents = encode(model, data.x_pub)
    return Shadow(model, latents, data.y_pub, latents.mean(0), latents.std(0) + 1e-6)


def run(setup: Setup, data_path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    data = load(setup, data_path)
    c, h, w = data.x_node.shape[1:]
    cnn = train_cnn(data.x_pub, data.y_pub, setup.cnn_epochs, setup.seed)
    ev = slice(len(data.x_node) - setup.evaluated, len(data.x_node))
    reference = {
        "cnn_accuracy_on_originals": cnn_accuracy(cnn, data.x_node[ev], data.y_node[ev]),
        "reidentification_chance": float(
            np.mean([1 / np.sum(data.y_node[ev] == yy) for yy in data.y_node[ev]])
        ),
    }
    logger.info("independent CNN on the node's real images: %s", reference)
    rows: list[dict[str, Any]] = []
    examples: dict[str, np.ndarray] = {"original": data.x_node[ev][:8]}
    train = TrainConfig(max_steps=setup.ae_steps)
    for dim in setup.latent_dims:
        ae = AutoencoderConfig(c, h, w, dim)
        node = train_autoencoder(data.x_node, ae, replace(train, seed=setup.seed))
        shadow = make_shadow(data, ae, replace(train, seed=setup.seed + 1))
        for dtype in setup.dtypes:
            rows.append(
                run_setting(
                    setup=setup,
                    data=data,
                    node=node,
                    shadow=shadow,
                    cnn=cnn,
                    dtype=dtype,
                    noise_std=0.0,
                    pairs=setup.pairs_sweep
                    if dim == setup.noise_dim and dtype == "float32"
                    else (),
                )
            )
        if dim != setup.noise_dim:
            continue
        for level in setup.noise_levels:
            if level == 0:
                continue
            rows.append(
                run_setting(
                    setup=setup,
                    data=data,
                    node=node,
                    shadow=shadow,
                    cnn=cnn,
                    dtype="float32",
                    noise_std=level,
                    pairs=(max(setup.pairs_sweep),),
                )
            )
        other = make_shadow(
            data, replace(ae, channels=setup.other_channels), replace(train, seed=setup.seed + 3)
        )
        rows.append(
            run_setting(
                setup=setup,
                data=data,
                node=node,
                shadow=other,
                cnn=cnn,
                dtype="float32",
                noise_std=0.0,
                pairs=(),
                references=False,
            )
        )
        for level in (0.0, 1.0):
            examples.update(_examples(setup, data, node, shadow, level, ev))
    return {
        "setup": asdict(setup),
        "data": str(data_path.name),
        "reference": reference,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "_examples": examples,
    }


def _examples(
    setup: Setup, data: Data, node: ConvAutoencoder, shadow: Shadow, level: float, ev: slice
) -> dict[str, np.ndarray]:
    clean = encode(node, data.x_node)
    noise = LatentNoise(LatentNoiseConfig(level, seed=setup.seed + 2), clean)
    received = noise(clean)
    pick = slice(ev.start, ev.start + 8)
    paired = paired_attack(shadow, received, data.x_node[: setup.pairs], slice(0, setup.pairs))
    unpaired = unpaired_attack(shadow, received, data.y_node, level, setup.moment_steps, setup.seed)
    return {
        f"paired (noise {level:g})": paired[pick],
        f"unpaired (noise {level:g})": unpaired[pick],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    setup = result["setup"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    rows = [r for r in rows if r["shadow"] == "same-architecture"]
    clean = [r for r in rows if r["noise_std"] == 0 and r["dtype"] == "float32"]
    clean.sort(key=lambda r: r["compression_ratio"])
    ratios = [r["compression_ratio"] for r in clean]
    for ax, metric, label in (
        (axes[0, 0], "psnr_db", "PSNR (dB)"),
        (axes[0, 1], "ssim", "SSIM"),
    ):
        for attack in ATTACKS:
            ax.plot(ratios, [r["attacks"][attack][metric] for r in clean], "o-", label=attack)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ratios, [f"{x:.0f}x" for x in ratios])
        ax.set_xlabel("compression ratio (784 / latent size), float32 latents, no noise")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    axes[0, 0].set_title(f"reconstruction of the node's images (paired: {setup['pairs']} pairs)")
    noisy = [r for r in rows if r["latent_dim"] == setup["noise_dim"] and r["dtype"] == "float32"]
    noisy.sort(key=lambda r: r["noise_std"])
    ax = axes[1, 0]
    for attack in ("paired", "unpaired"):
        xs = [r["attacks"][attack]["ssim"] for r in noisy]
        ys = [r["server_accuracy"] for r in noisy]
        ax.plot(xs, ys, "o-", label=f"{attack} attack")
        if attack == "unpaired":
            for r, x, y in zip(noisy, xs, ys, strict=True):
                if r["noise_std"] >= 0.25:
                    ax.annotate(
                        f"noise {r['noise_std']:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(6, -4),
                    )
    ax.axvline(noisy[0]["attacks"]["prototype"]["ssim"], color="grey", ls="--", label="prototype")
    ax.set_xlabel("attack SSIM (lower = more private)")
    ax.set_ylabel("server classifier accuracy")
    ax.set_title(f"defence: --latent-noise (point labels), latent {setup['noise_dim']}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1, 1]
    examples = result["_examples"]
    names = list(examples)
    grid = np.concatenate([np.concatenate(list(examples[n][:, 0]), axis=1) for n in names], axis=0)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([14 + 28 * k for k in range(len(names))], names)
    ax.set_xticks([])
    ax.set_title(f"examples, latent {setup['noise_dim']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [
        "| latent | ratio | dtype | B/sample | noise | server acc | shadow conv | attack | PSNR dB "
        "| SSIM | CNN acc | re-id |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for name, a in r["attacks"].items():
            lines.append(
                f"| {r['latent_dim']} | {r['compression_ratio']:.1f} | {r['dtype']} "
                f"| {r['bytes_per_sample']} | {r['noise_std']:g} | {r['server_accuracy']:.4f} "
                f"| {'-'.join(map(str, r['shadow_channels']))} | {name} | {a['psnr_db']:.2f} "
                f"| {a['ssim']:.3f} | {a['cnn_accuracy']:.3f} | {a['reidentification']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MNIST, help="MNIST .npz (x/y train/test)")
    parser.add_argument("--quick", action="store_true", help="smoke test: < 1 min")
    parser.add_argument("--out", type=Path, help="JSON results (docs/privacy.json)")
    parser.add_argument("--plot", type=Path, help="figure (docs/img/privacy.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("edge.trainer", "server.classifier", "common.datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    default_dir = ROOT / ("runs/privacy" if args.quick else "docs")
    out = args.out or default_dir / "privacy.json"
    figure = args.plot or (default_dir / ("privacy.png" if args.quick else "img/privacy.png"))
    result = run(setup, args.data)
    plot(result, figure)
    result.pop("_examples")
    result["command"] = "experiments/privacy_attack.py" + (" --quick" if args.quick else "")
    result["torch_threads"] = args.threads
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(table(result) + "\n")
    sys.stdout.write(
        f"reference: {result['reference']}\n{math.ceil(result['seconds'])} s; wrote {out} and "
        f"{figure}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
