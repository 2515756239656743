"""Every method is a folder on each side, and each registry knows it under the same name."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.methods import server_methods
from edge_agent.methods import client_methods
from protocol.methods import NAMES, PARAMS

ROOT = Path(__file__).resolve().parents[1]
ROLE = {"protocol": "spec.py", "edge_agent": "client.py", "aggregator": "server.py"}


@pytest.mark.parametrize("name", NAMES)
def test_method_has_three_folders_and_registrations(name: str) -> None:
    for package, role in ROLE.items():
        folder = ROOT / package / "methods" / name
        assert (folder / "__init__.py").is_file(), folder
        assert (folder / role).is_file(), folder / role
        assert not (ROOT / package / "methods" / f"{name}.py").exists()
    assert name in PARAMS
    client = client_methods()[name]()
    assert client.name == name
    assert name in server_methods()


def test_registries_agree() -> None:
    assert set(PARAMS) == set(client_methods()) == set(server_methods()) == set(NAMES)
    assert "fedit" in NAMES
