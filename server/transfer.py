"""The transfer-learning half of the server: base model versions, deltas, aggregation.

:class:`ModelHub` keeps the versions of the served base model in the store (version 1 is the
pre-trained file given with ``--base-model``; each aggregation adds the next), checks every
incoming fine-tuning delta against the base it names (version and content hash, tensor names,
shapes, finite values), builds each node's fine-tuned model (its newest delta applied to the
base it was computed against) and averages the nodes' deltas into the next base version,
weighted by their training samples.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.delta import DeltaEntry, apply_delta, check_delta, dense_delta
from common.errors import CodecError, ConflictError, InvalidRequestError, NotFoundError
from common.modelfile import ModelFile, content_hash, parse_model_bytes, read_model_file
from common.records import ModelVersion, StoredDelta
from server.store import Store

logger = logging.getLogger(__name__)

_CACHE_MODELS = 16
"""Parsed model files (base versions and fine-tuned models) kept in memory."""


@dataclass(frozen=True)
class ServedModel:
    """A model file ready to stream: its bytes, hash, base version and parsed tensors."""

    data: bytes
    hash: str
    version: int
    model: ModelFile
    delta_upload_id: str = ""
    """Set for a node's fine-tuned model."""


class ModelHub:
    """Base versions, delta checks, fine-tuned models and aggregation over one store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._aggregate_lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, str], ServedModel] = OrderedDict()

    # -- base versions ------------------------------------------------------------------------

    def load_base(self, path: str | Path) -> ModelVersion:
        """Serve the model file at ``path``: a new version unless the newest already is it.

        Raises:
            ConfigError: the file cannot be read or is not a latentedge model file.
        """
        model, digest = read_model_file(path)
        model.to_torch()  # refuse (ConfigError) tensors that do not fit the spec's network
        newest = self._store.get_model()
        if newest is not None and newest[0].hash == digest:
            logger.info("base model %s is version %d already", path, newest[0].version)
            return newest[0]
        for known in self._store.list_models():
            if known.hash == digest:
                logger.info(
                    "base model %s equals version %d; serving it again as a new version",
                    path,
                    known.version,
                )
        data = Path(path).read_bytes()
        parent = newest[0].version if newest is not None else 0
        if newest is not None:
            old = parse_model_bytes(newest[1], f"base version {newest[0].version}")
            if old.spec != model.spec:
                logger.warning(
                    "base model %s is a different network (%s) from version %d (%s); deltas "
                    "against older versions still apply to those versions",
                    path,
                    model.spec.to_json(),
                    newest[0].version,
                    old.spec.to_json(),
                )
        version = self._store.add_model(data, digest, parent=parent, source=f"file:{path}")
        logger.info(
            "serving base model %s as version %d (%s, %d tensors, sha256 %s)",
            path,
            version.version,
            model.spec.name,
            len(model.tensors),
            digest[:12],
        )
        return version

    def current_version(self) -> int:
        """The newest base version (0 = none)."""
        newest = self._store.get_model()
        return newest[0].version if newest is not None else 0

    def versions(self) -> list[ModelVersion]:
        """Every base version, oldest first."""
        return self._store.list_models()

    def base(self, version: int = 0) -> ServedModel:
        """A base version (0 = the newest), parsed and cached.

        Raises:
            NotFoundError: no base model is served, or that version does not exist.
        """
        current = self.current_version()
        if version == 0:
            version = current
            if version == 0:
                raise NotFoundError(
                    "this server serves no base model; start it with --base-model PATH"
                )
        if version > current:  # (also keeps numbers past SQLite's 63-bit range away from it)
            raise NotFoundError(f"base version {version} does not exist (current is {current})")
        key = (version, "")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        found = self._store.get_model(version)
        if found is None:
            raise NotFoundError(
                f"base version {version} does not exist (current is {self.current_version()})"
            )
        info, data = found
        served = ServedModel(data, info.hash, info.version, parse_model_bytes(data))
        self._remember(key, served)
        return served

    def _remember(self, key: tuple[int, str], served: ServedModel) -> None:
        with self._lock:
            self._cache[key] = served
            while len(self._cache) > _CACHE_MODELS:
                self._cache.popitem(last=False)

    # -- deltas -------------------------------------------------------------------------------

    def check_base(self, version: int, base_hash: str) -> ServedModel:
        """The base a delta names, if it exists and its hash matches.

        Raises:
            ConflictError: unknown version or hash mismatch (FAILED_PRECONDITION).
        """
        try:
            base = self.base(version) if version else None
        except NotFoundError as exc:
            raise ConflictError(f"base version mismatch: {exc}") from exc
        if base is None:
            raise InvalidRequestError("base_version must be >= 1 (the version the delta is for)")
        if base_hash != base.hash:
            raise ConflictError(
                f"base version mismatch: version {version} has sha256 {base.hash}, the delta "
                f"names {base_hash or '(empty)'}; download the base again"
            )
        return base

    @staticmethod
    def check_entries(base: ServedModel, entries: Sequence[DeltaEntry], seq: int) -> None:
        """Check entries against the base's tensors; INVALID_ARGUMENT names the first bad one."""
        try:
            check_delta(entries, base.model.shapes())
        except CodecError as exc:
            raise InvalidRequestError(f"chunk {seq}: {exc}") from exc

    def fine_tuned(self, node_id: str) -> ServedModel:
        """``node_id``'s newest delta applied to the base it was computed against.

        Raises:
            NotFoundError: the node has sent no delta.
        """
        deltas = self._store.latest_deltas(node_id=node_id)
        if not deltas:
            raise NotFoundError(f"node {node_id!r} has no committed fine-tuning delta")
        delta = deltas[0]
        key = (delta.base_version, delta.upload_id)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        base = self.base(delta.base_version)
        tensors = apply_delta(base.model.tensors, delta.entries)
        meta = {
            **base.model.meta,
            "base_version": str(delta.base_version),
            "base_hash": base.hash,
            "fine_tuned_for": node_id,
            "delta_upload_id": delta.upload_id,
        }
        model = ModelFile(base.model.spec, tensors, meta)
        data = model.to_bytes()
        served = ServedModel(data, content_hash(data), delta.base_version, model, delta.upload_id)
        self._remember(key, served)
        return served

    # -- aggregation --------------------------------------------------------------------------

    def pending(self) -> list[StoredDelta]:
        """Each node's newest delta against the current base."""
        version = self.current_version()
        return self._store.latest_deltas(version) if version else []

    def aggregate(self, min_nodes: int = 1) -> ModelVersion | None:
        """Average the nodes' newest deltas against the current base into the next version.

        ``new = base + sum_i (n_i / n) * delta_i`` over the nodes ``i`` (``n_i`` training
        samples); a tensor a node left out counts as an unchanged (zero) delta for it.

        Returns:
            The new version, or None when fewer than ``min_nodes`` nodes sent a delta.
        """
        with self._aggregate_lock:
            base = self.base()
            deltas = self._store.latest_deltas(base.version)
            if len(deltas) < max(1, min_nodes):
                return None
            total = sum(d.samples for d in deltas)
            tensors = {k: v.astype(np.float64) for k, v in base.model.tensors.items()}
            for delta in deltas:
                weight = delta.samples / total
                for name, d in dense_delta(base.model.tensors, delta.entries).items():
                    tensors[name] += weight * d
            nodes = tuple(d.node_id for d in deltas)
            meta = {
                **base.model.meta,
                "parent_version": str(base.version),
                "aggregated_nodes": ",".join(nodes),
            }
            model = ModelFile(
                base.model.spec, {k: v.astype(np.float32) for k, v in tensors.items()}, meta
            )
            data = model.to_bytes()
            version = self._store.add_model(
                data,
                content_hash(data),
                parent=base.version,
                source="aggregate",
                nodes=nodes,
                samples=total,
            )
        logger.info(
            "aggregated %d node delta(s) (%d samples) on version %d into version %d",
            len(deltas),
            total,
            base.version,
            version.version,
        )
        return version
