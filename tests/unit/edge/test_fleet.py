"""The fleet's configuration checks and node-to-worker mapping (no processes, no server)."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from edge.fleet import FleetConfig, _split, make_backend


def test_node_ids_are_zero_padded_to_the_fleet_size() -> None:
    config = FleetConfig(server="127.0.0.1:1", nodes=1000, node_prefix="n-")
    assert [config.node_id(i) for i in (0, 7, 999)] == ["n-000", "n-007", "n-999"]
    edge = config.edge_config(7)
    assert edge.node_id == "n-007" and edge.shard == "7/1000" and edge.scheduled


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"nodes": 0}, "fleet.nodes must be >= 1"),
        ({"rounds": 0}, "fleet.rounds must be >= 1"),
        ({"workers": 0}, "fleet.workers must be >= 1"),
        ({"epochs": 0}, "fleet.epochs and fleet.finetune_epochs must be >= 1"),
        ({"samples_per_node": -1}, "fleet.samples_per_node must be >= 0"),
        ({"latent_dtype": "int4"}, "edge.latent_dtype must be float32, float16 or int8"),
        ({"trainable": "everything"}, "trainable"),
    ],
)
def test_bad_settings_name_the_field(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FleetConfig(**{"server": "127.0.0.1:1", "nodes": 4, **changes})  # type: ignore[arg-type]


def test_node_i_always_goes_to_worker_i_mod_workers() -> None:
    assert _split(list(range(7)), 3, lambda i: i) == [[0, 3, 6], [1, 4], [2, 5]]
    # a subset (e.g. the nodes that registered) keeps every node on its worker
    assert _split([1, 5, 6], 3, lambda i: i) == [[6], [1], [5]]


def test_unknown_backend_and_stray_ray_address_are_refused() -> None:
    config = FleetConfig(server="127.0.0.1:1", nodes=2)
    with pytest.raises(ConfigError, match="--backend must be one of"):
        make_backend("dask", config)
    with pytest.raises(ConfigError, match="--ray-address needs --backend ray"):
        make_backend("local", config, ray_address="127.0.0.1:6379")
