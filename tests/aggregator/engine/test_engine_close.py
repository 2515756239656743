"""A run's engine, once the run is over, leaves nothing running behind it."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer


def rebuild_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ferret-rebuild")]


def test_closing_a_ferret_server_stops_its_rebuild_thread(tiny_model_dir: Path) -> None:
    before = len(rebuild_threads())
    server = FerretServer({"ferret": {"k": 8}}, MethodContext(model_dir=tiny_model_dir))
    groups = server.n_groups
    triples = (
        torch.arange(groups, dtype=torch.int32),
        torch.zeros(groups, dtype=torch.int32),
        torch.full((groups,), 1e-3),
    )
    server._commit(1, triples)  # a committed round's step, rebuilt on the pool's thread
    assert len(rebuild_threads()) == before + 1
    server.close()
    assert server.applied == 1  # the queued rebuild finished first
    assert len(rebuild_threads()) == before
