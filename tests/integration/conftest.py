from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support_grpc import RunningServer, running_server


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A real gRPC server on 127.0.0.1:0 over a real SQLite file; small upload limit."""
    yield from running_server(tmp_path)
