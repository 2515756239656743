"""The example configs name every method edgefed ships, not only some."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.methods import NAMES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["examples/aggregator.toml", "docker/config/aggregator.toml"])
def test_example_config_lists_every_method(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    comment = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert [m for m in NAMES if m not in comment] == []
