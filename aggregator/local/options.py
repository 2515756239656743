"""The options of ``edgefed-aggregator local`` and the parsers of its command-line values.

``LocalOptions`` is what :func:`aggregator.local.run.run_local` runs; ``parse_agent_limits`` reads
``--agent-limit AGENT:memory=SIZE,bandwidth=MBPS`` (sizes by ``parse_size``: ``600MB``,
``1.5GiB``, bare bytes) and ``parse_params`` reads ``--param KEY.PATH=VALUE`` into the nested
method parameters (values as JSON when they parse, else strings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LocalOptions:
    method: str
    agents: int
    rounds: int
    workdir: Path
    model: str
    alpha: float
    per_agent: int
    steps: int
    batch_size: int
    lr: float
    rank: int
    quant: str
    insecure: bool
    merge: bool
    seed: int
    eval_examples: int
    method_params: dict[str, Any] | None = None
    agent_limits: dict[str, dict[str, float]] | None = None
    """Per agent id, simulated limits: ``memory`` (bytes) and ``bandwidth`` (Mbit/s)."""
    regions: int = 0
    """Regional tiers to put the agents behind (0: they join the aggregator directly)."""
    privacy: dict[str, Any] | None = None
    """The run's ``[privacy]`` section (``--secagg``, ``--dp-epsilon``)."""
    data: str = "demo"
    """``demo``, ``natural-instructions`` or a split directory (:mod:`aggregator.local.data`)."""
    metrics_port: int | None = None
    """Serve the aggregator's Prometheus metrics on this loopback port (0: any free port)."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """``"600MB"`` → 600000000; ``"1.5GiB"``; a bare number is bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 600MB, 1.5GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_agent_limits(specs: Sequence[str]) -> dict[str, dict[str, float]]:
    """``["agent-2:memory=600MB,bandwidth=20"]`` → ``{"agent-2": {"memory": 6e8, ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        agent, sep, rest = spec.partition(":")
        if not sep or not agent:
            raise ValueError(f"{spec!r}: expected AGENT:memory=SIZE,bandwidth=MBPS")
        limits = out.setdefault(agent, {})
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in ("memory", "bandwidth"):
                raise ValueError(f"{spec!r}: {item!r} is not memory=SIZE or bandwidth=MBPS")
            try:
                limits[key] = float(parse_size(value)) if key == "memory" else float(value)
            except ValueError:
                raise ValueError(f"{spec!r}: bad value {value!r} for {key}") from None
            if limits[key] <= 0:
                raise ValueError(f"{spec!r}: {key} must be positive")
    return out


def parse_params(specs: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=4", "emulator.drop=0.5"]`` → nested dict (values as JSON when they parse)."""
    out: dict[str, Any] = {}
    for spec in specs:
        key, eq, raw = spec.partition("=")
        if not eq or not key:
            raise ValueError(f"{spec!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{spec!r}: {part} is already a value")
        node[parts[-1]] = value
    return out


def local_privacy(*, secagg: bool, dp_epsilon: float | None, dp_mode: str) -> dict[str, Any]:
    """The ``[privacy]`` section ``local --secagg --dp-epsilon E --dp MODE`` asks for."""
    privacy: dict[str, Any] = {}
    if secagg:
        privacy["secure_aggregation"] = True
    if dp_epsilon is not None:
        privacy |= {"dp": dp_mode, "target_epsilon": dp_epsilon}
    return privacy
