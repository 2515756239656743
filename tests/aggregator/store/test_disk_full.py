"""A full disk while checkpointing: one clear error, and nothing committed is lost."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from engine_harness import NAMES, Harness, lora_state, start_round

import aggregator.store.checkpoint as checkpoint
from aggregator.errors import StateError


def test_disk_full_during_checkpoint_then_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 10, lora_state(3.0))
    h.tick()  # round 1 committed
    round1 = h.store.load(1)[0]
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(5.0))
    h.result(tasks["a2"], "a2", 30, lora_state(7.0))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(
        StateError, match="no space left on the device; free space there and restart"
    ):
        h.tick()
    monkeypatch.undo()
    h.close()

    h2 = Harness(tmp_path)  # restarted after space was freed
    try:
        assert h2.engine.round == 1
        torch.testing.assert_close(h2.store.load(1)[0][NAMES[0]], round1[NAMES[0]], rtol=0, atol=0)
        start_round(h2, ["a1", "a2"])  # both updates of round 2 were acknowledged and are replayed
        h2.tick()
        assert h2.engine.round == 2
        expected = (10 * lora_state(5.0)[NAMES[0]] + 30 * lora_state(7.0)[NAMES[0]]) / 40
        torch.testing.assert_close(h2.store.load(2)[0][NAMES[0]], expected, rtol=0, atol=1e-6)
    finally:
        h2.close()
