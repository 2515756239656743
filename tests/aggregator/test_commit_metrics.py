"""A kill between the checkpoint write and the ledger commit keeps the round's metrics (issue 24)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_harness import Harness, lora_state, start_round


class Killed(Exception):
    """Stands for the SIGKILL: the process stops right after the checkpoint is durable."""


def test_metrics_survive_a_kill_between_checkpoint_and_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 30, lora_state(3.0))

    def killed(*_args: Any, **_kw: Any) -> None:
        raise Killed

    monkeypatch.setattr(h.ledger, "commit_round", killed)
    with pytest.raises(Killed):
        h.tick()
    assert h.store.latest() == 1  # the checkpoint is on disk, the ledger never heard of it
    h.close()
    monkeypatch.undo()

    h2 = Harness(tmp_path)  # the restart finishes the commit
    try:
        (row,) = h2.ledger.rounds("run-t")
        assert row.committed_at is not None
        assert row.metrics["agents"] == 2.0 and row.metrics["train_loss"] == 1.0
        assert "edgefed.round_metrics" not in h2.method.state()[1]
    finally:
        h2.close()
