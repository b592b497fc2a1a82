"""HOST:PORT addresses are checked whole, with the port in range, before anything connects."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.tls import check_address
from tests.conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize("address", ["h:99999", "h:65536", "h", "h:", ":5", "h:-1", "h:5x", "h:0"])
def test_bad_client_addresses(address: str) -> None:
    with pytest.raises(ConfigError, match=r"--server must be HOST:PORT with a port in 1\.\.65535"):
        check_address(address, "--server")


def test_good_addresses() -> None:
    assert check_address("[::1]:50051", "--server") == "[::1]:50051"
    assert check_address("0.0.0.0:0", "server.listen", listen=True) == "0.0.0.0:0"
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        check_address("0.0.0.0:65536", "server.listen", listen=True)


@pytest.mark.parametrize(
    "argv",
    [
        ("status", "--server", "127.0.0.1:99999"),
        ("models", "--server", "127.0.0.1:99999"),
        ("edge", "--server", "127.0.0.1:99999", "--node-id", "n0"),
        ("server", "--listen", "127.0.0.1:70000", "--db", "/nonexistent/x.db"),
        ("server", "--metrics-listen", "127.0.0.1:70000", "--db", "/nonexistent/x.db"),
    ],
)
def test_every_command_refuses_a_port_out_of_range(argv: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli(*argv), 3, "65535")
