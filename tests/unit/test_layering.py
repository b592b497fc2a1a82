"""Import layering (docs/architecture.md): protos < common < edge | server; device_sim: no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("latentedge", "protos", "common", "edge", "server", "device_sim")

# package -> top-level imports it must never make
FORBIDDEN: dict[str, set[str]] = {
    "protos": {"common", "edge", "server", "device_sim", "latentedge", "torch"},
    "common": {"edge", "server", "latentedge"},
    "edge": {"server", "latentedge"},
    "server": {"edge", "latentedge"},
    "device_sim": {"edge", "server", "latentedge", "torch", "protos"},
}
GENERATED_IMPORTERS = {"common/serde.py", "edge/uplink.py", "server/servicer.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name]


def test_no_forbidden_imports() -> None:
    violations = []
    for package, banned in FORBIDDEN.items():
        for path in _files(package):
            for module in _imports(path):
                top = module.split(".")[0]
                if top in banned:
                    violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert violations == []


def test_device_sim_uses_only_torch_free_leaf_modules_of_common() -> None:
    for path in _files("device_sim"):
        for module in _imports(path):
            if module.split(".")[0] == "common":
                assert module in ("common.errors", "common.ray_session"), f"{path} imports {module}"


def test_common_init_is_empty() -> None:
    assert (ROOT / "common" / "__init__.py").read_text().strip() == ""


def test_only_boundary_modules_import_generated_code() -> None:
    offenders = []
    for package in ("common", "edge", "server", "latentedge"):
        for path in _files(package):
            rel = str(path.relative_to(ROOT))
            uses_pb2 = any("_pb2" in m for m in _imports(path))
            if uses_pb2 and rel not in GENERATED_IMPORTERS:
                offenders.append(rel)
    assert offenders == []


def test_simulate_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from latentedge.cli import main\n"
        "try:\n"
        "    main(['simulate', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'simulate pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
