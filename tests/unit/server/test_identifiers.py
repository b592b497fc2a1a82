"""Identifiers read from the network are matched whole."""

from __future__ import annotations

import pytest

from common.errors import InvalidRequestError
from common.records import NodeRegistration
from server.core import validate_registration


@pytest.mark.parametrize("node_id", ["n0\n", "n0 ", " n0", "n0\x00", "", "-n0", "n" * 65, "nö"])
def test_node_ids_with_anything_around_them_are_refused(node_id: str) -> None:
    with pytest.raises(InvalidRequestError, match="node_id must match"):
        validate_registration(NodeRegistration(node_id, 4, 2))


def test_a_plain_node_id_is_accepted() -> None:
    validate_registration(NodeRegistration("plant-a_camera.1", 4, 2))
