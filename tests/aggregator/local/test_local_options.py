from __future__ import annotations

import pytest

from aggregator.local.options import parse_agent_limits, parse_params, parse_size


def test_sizes() -> None:
    assert parse_size("600MB") == 600_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_agent_limits() -> None:
    limits = parse_agent_limits(["agent-2:memory=600MB,bandwidth=20", "agent-3:bandwidth=5"])
    assert limits == {
        "agent-2": {"memory": 6e8, "bandwidth": 20.0},
        "agent-3": {"bandwidth": 5.0},
    }
    for bad in ("agent-2", "agent-2:speed=3", "agent-2:bandwidth=-1", "agent-2:memory=x"):
        with pytest.raises(ValueError):
            parse_agent_limits([bad])


def test_params_nest_and_parse_json() -> None:
    assert parse_params(["train.steps=4", "train.lr=0.01", "emulator.name=abc", "k=[1,2]"]) == {
        "train": {"steps": 4, "lr": 0.01},
        "emulator": {"name": "abc"},
        "k": [1, 2],
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["nothing"])
