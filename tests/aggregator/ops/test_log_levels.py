"""Warnings are for what an operator should act on: SLoRA's switch to LoRA is logged at INFO."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from aggregator.engine.admission import Admission, Waiting
from aggregator.engine.registry import Registry
from protocol.messages import BaseModelRef, Hello, Profile

from engine_harness import PROFILE, SHA  # isort: skip


class Method:
    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        return self.reason


def admission() -> Admission:
    registry = Registry(interval=1.0, liveness=3)
    registry.hello("a1", Hello(agent_id="a1", versions=[1], profile=PROFILE, models=[SHA]), 0.0)
    ledger: Any = None  # assignable never touches the ledger
    return Admission(registry, ledger, BaseModelRef(name="m", sha256=SHA), "slora")


@pytest.mark.parametrize(
    ("reason", "level"),
    [(Waiting("switching to LoRA: the SVDs (3 s so far)"), logging.INFO),
     ("not enough memory", logging.WARNING)],
)  # fmt: skip
def test_a_passing_wait_is_info_a_refusal_is_a_warning(
    reason: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    method: Any = Method(reason)
    with caplog.at_level(logging.DEBUG, logger="aggregator.engine.admission"):
        assert admission().assignable(method, ["a1"]) == []
    [record] = [r for r in caplog.records if "not assigned" in r.getMessage()]
    assert record.levelno == level


def test_slora_switch_in_progress_is_a_wait() -> None:
    import threading
    import time

    from aggregator.methods import MethodContext
    from aggregator.methods.slora.server import SloraServer

    server = SloraServer({}, MethodContext(seed=0))
    assert server.admit("a1", PROFILE) is None
    release = threading.Event()
    server._job = threading.Thread(target=release.wait, daemon=True)
    server._job.start()
    server._job_since = time.monotonic()
    try:
        reason = server.admit("a1", PROFILE)
        assert isinstance(reason, Waiting) and reason.startswith("switching to LoRA")
    finally:
        release.set()
        server._job.join()
