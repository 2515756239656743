"""The local job's throw-away files: CURVE keys for the aggregator and its agents, agent configs.

``edgefed-aggregator local`` (:mod:`aggregator.local.run`) and its regional variant
(:mod:`aggregator.local.regions`) both write them into the run's working directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import zmq.auth


def make_keys(workdir: Path, agent_ids: list[str]) -> dict[str, Path]:
    keys = workdir / "keys"
    allow = keys / "allow"
    for d in (keys, allow):
        d.mkdir(parents=True, exist_ok=True)
    pub, secret = zmq.auth.create_certificates(str(keys), "aggregator")
    os.chmod(secret, 0o600)
    for agent_id in agent_ids:
        a_pub, a_secret = zmq.auth.create_certificates(str(keys), agent_id)
        os.chmod(a_secret, 0o600)
        shutil.copy(a_pub, allow / Path(a_pub).name)
    return {"server_public": Path(pub), "server_secret": Path(secret), "allow": allow, "dir": keys}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_agent_config(path: Path, values: dict[str, dict[str, object]]) -> None:
    lines: list[str] = []
    for section, items in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in items.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
