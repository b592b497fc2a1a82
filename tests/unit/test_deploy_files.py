"""The deployment files describe replicas the CLI accepts: parsed by latentedge's own parser."""

from __future__ import annotations

from pathlib import Path

import yaml

from latentedge.cli import _build_parser
from server.cli import load_config
from server.store import describe_store, is_postgres_url
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def _server_config(argv: list[str]) -> object:
    args = [a.replace("/etc/latentedge/server.toml", str(DEPLOY / "server.toml")) for a in argv]
    parser, _module, _sub = _build_parser("server")
    return load_config(parser.parse_args(args))


def test_compose_runs_two_replicas_on_one_database_and_payload_volume() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    replicas = [s for s in services.values() if s.get("command", [""])[0] == "server"]
    assert len(replicas) >= 2
    configs = [_server_config(s["command"]) for s in replicas]
    dbs = {c.db for c in configs}  # type: ignore[attr-defined]
    payload_dirs = {c.payload_dir for c in configs}  # type: ignore[attr-defined]
    assert len(dbs) == 1 and is_postgres_url(dbs.pop())
    (payload_dir,) = payload_dirs
    for service in replicas:  # the same named volume mounted where --payload-dir points
        assert any(v.split(":")[1] == payload_dir for v in service["volumes"]), service
        assert "server" in service["networks"]["default"]["aliases"]
        assert "postgres" in service["depends_on"]
    assert {s["ports"][0].split(":")[0] for s in replicas} == {"50051", "50052"}
    assert "postgres" in services and services["postgres"]["healthcheck"]


def test_the_kubernetes_deployment_scales_replicas_on_postgresql() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"]}
    assert {"LATENTEDGE_DB_URL", "PGPASSWORD"} <= env
    argv = [
        a.replace("$(LATENTEDGE_DB_URL)", "postgresql://u@db:5432/le") for a in container["args"]
    ]
    assert _server_config(argv).db == "postgresql://u@db:5432/le"  # type: ignore[attr-defined]


def test_the_image_installs_the_postgresql_driver() -> None:
    assert 'pip install ".[postgres]"' in (DEPLOY / "Dockerfile").read_text()


def test_describe_store_hides_passwords() -> None:
    assert describe_store("postgresql://u:s3cret@db:5432/le?sslmode=require") == (
        "postgresql://u@db:5432/le"
    )
    assert describe_store(Path("a/b.db")) == "a/b.db"
