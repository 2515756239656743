"""Every method has its three files, and each registry knows it under the same name."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.methods import server_methods
from edge_agent.methods import client_methods
from protocol.methods import NAMES, PARAMS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", NAMES)
def test_method_has_three_files_and_registrations(name: str) -> None:
    for package in ("protocol", "edge_agent", "aggregator"):
        assert (ROOT / package / "methods" / f"{name}.py").is_file()
    assert name in PARAMS
    client = client_methods()[name]()
    assert client.name == name
    assert name in server_methods()


def test_registries_agree() -> None:
    assert set(PARAMS) == set(client_methods()) == set(server_methods()) == set(NAMES)
    assert "fedit" in NAMES
