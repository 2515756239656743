"""``edgefed-aggregator local --regions K``: the same run with its agents behind K regional tiers.

The run's aggregator (in the ``local`` process) becomes the upstream: its allow-list and
``[security] regions`` hold the regions ``region-1..K``, and it waits for K participants. Each
region is its own ``edgefed-aggregator region`` process on a port of its own, with its own state
directory and, unless ``--insecure``, its own CURVE keys toward its agents; agents are dealt to
regions in contiguous blocks (``agent-1, agent-2`` to ``region-1``, …) and connect to their
region instead of the upstream. Everything else — data, model, method parameters, the round
table (its per-participant rows are now the regions) and the export — is the flat run's.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.errors import AggregatorError
from aggregator.local.workdir import make_keys, write_agent_config
from protocol.parent import child_env


@dataclass(frozen=True)
class AgentLink:
    """Where an agent connects and with which keys (None: insecure)."""

    endpoint: str
    secret_key: Path | None
    server_public_key: Path | None


def region_ids(count: int) -> list[str]:
    return [f"region-{i + 1}" for i in range(count)]


def deal(agent_ids: list[str], count: int) -> dict[str, list[str]]:
    """Agents to regions in contiguous blocks, sizes differing by at most one."""
    if not 1 <= count <= len(agent_ids):
        raise AggregatorError(f"--regions {count}: give between 1 and --agents ({len(agent_ids)})")
    sizes = [len(agent_ids) // count + (1 if i < len(agent_ids) % count else 0)
             for i in range(count)]  # fmt: skip
    out, start = {}, 0
    for region, size in zip(region_ids(count), sizes, strict=True):
        out[region] = agent_ids[start : start + size]
        start += size
    return out


def aggregator_command() -> list[str]:
    script = Path(sys.executable).with_name("edgefed-aggregator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "aggregator"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_regions(
    workdir: Path,
    members: dict[str, list[str]],
    upstream: str,
    upstream_keys: dict[str, Path] | None,
    run: dict[str, Any],
) -> tuple[dict[str, AgentLink], list[subprocess.Popen[bytes]], list[Any]]:
    """Start one region process per entry of ``members``; where each agent connects, the
    processes and their open log files. ``run``: the region's ``[run]`` values. With
    ``upstream_keys`` (CURVE toward the upstream) each region also gets keys toward its agents."""
    links: dict[str, AgentLink] = {}
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    for region, agents in members.items():
        port, base = _free_port(), workdir / region
        base.mkdir(parents=True, exist_ok=True)
        keys = make_keys(base, agents) if upstream_keys is not None else None
        security: dict[str, object] = (
            {"insecure": True}
            if keys is None
            else {"secret_key": str(keys["server_secret"]), "allow_dir": str(keys["allow"])}
        )
        toward_up: dict[str, object] = {"insecure": True}
        if upstream_keys is not None:
            toward_up = {
                "secret_key": str(upstream_keys["dir"] / f"{region}.key_secret"),
                "server_public_key": str(upstream_keys["server_public"]),
            }
        config = base / "region.toml"
        write_agent_config(
            config,
            {
                "server": {"bind": f"tcp://127.0.0.1:{port}", "state_dir": str(base / "state"),
                           "heartbeat_interval": 1.0, "liveness": 15},
                "security": security,
                "run": {**run, "min_agents": len(agents)},
                "upstream": {"endpoint": upstream, "id": region, "heartbeat_interval": 1.0,
                             "liveness": 15, **toward_up},
            },
        )  # fmt: skip
        logs.append(open(workdir / "logs" / f"{region}.log", "wb"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [*aggregator_command(), "region", "--config", str(config)],
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        )
        for agent in agents:
            links[agent] = AgentLink(
                f"tcp://127.0.0.1:{port}",
                keys["dir"] / f"{agent}.key_secret" if keys else None,
                keys["server_public"] if keys else None,
            )
    return links, procs, logs
