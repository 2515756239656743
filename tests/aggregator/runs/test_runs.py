"""Many runs in one state dir: each in its own folder, restored from its own checkpoints, ended
with a status in the ledger (a run that cannot start is ``failed`` with the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_harness import MODEL, Harness, lora_state

from aggregator.engine.commits import RoundCommits
from aggregator.engine.engine import RoundEngine
from aggregator.errors import ConfigError, StateError
from aggregator.methods.fedit.server import FeditServer
from aggregator.ops.config import AggregatorConfig
from aggregator.runs.lifecycle import Lifecycle
from aggregator.runs.state import RunBook, submitted_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol.messages import TaskAssign

AGENTS = ("a1", "a2")


def finish_one_round(h: Harness) -> None:
    for agent in AGENTS:
        h.hello(agent)
    tasks = [o for o in h.tick() if isinstance(o.header, TaskAssign)]
    assert len(tasks) == 2
    for o in tasks:
        assert isinstance(o.header, TaskAssign)
        h.result(o.header, o.agent_id, 10, lora_state(1.0))
    h.tick()
    assert h.engine.finished


def test_a_new_run_id_in_a_used_state_dir_starts_fresh_in_its_own_folder(tmp_path: Path) -> None:
    old = Harness(tmp_path, rounds=1, run_id="edge-run-1")
    finish_one_round(old)
    config = old.config
    old.close()

    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = RunBook(ledger, tmp_path)

    def build(cfg: AggregatorConfig, start: bool) -> RoundEngine:
        if cfg.run.run_id == "bad":
            raise ConfigError("run bad: the model cannot be found")
        store = CheckpointStore(cfg.server.state_dir / "checkpoints")
        engine = RoundEngine(cfg, FeditServer(cfg.method), MODEL, ledger=ledger, store=store)
        if start:
            engine.start()
        return engine

    lifecycle = Lifecycle(book, build, lambda _e: None)
    second = config.model_copy(
        update={"run": config.run.model_copy(update={"run_id": "edge-run-2", "rounds": 2})}
    )
    engine = lifecycle.adopt(second)
    assert (lifecycle.active, engine.run_id, engine.round, engine.finished) == (
        "edge-run-2",
        "edge-run-2",
        0,
        False,
    )
    assert book.info("edge-run-1").status == "finished"  # a run from before runs had a status
    assert book.info("edge-run-1").directory == tmp_path
    assert book.info("edge-run-2").directory == tmp_path / "runs" / "edge-run-2"
    assert book.info("edge-run-2").status == "running"

    bad = submitted_config(
        config, '[run]\nrun_id = "bad"\nmodel_sha256 = "' + "cd" * 32 + '"\n', "bad.toml"
    )
    book.submit(bad)
    lifecycle.stop("edge-run-2", "stopped by the operator")
    lifecycle.step(0.0)  # the next queued run cannot start: failed, with the reason
    assert book.info("bad").status == "failed"
    assert book.info("bad").reason == "run bad: the model cannot be found"
    assert book.info("edge-run-2").status == "stopped"
    assert lifecycle.active is None
    assert [i.run_id for i in book.all()] == ["edge-run-1", "edge-run-2", "bad"]
    ledger.close()


def test_a_run_refuses_the_checkpoints_of_another_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1, run_id="edge-run-1")
    finish_one_round(h)
    with pytest.raises(StateError, match="belong to run edge-run-1, not edge-run-2"):
        RoundCommits(h.ledger, h.store).restore(FeditServer(h.config.method), "edge-run-2")
    h.close()


def test_a_run_file_holds_run_and_method_only_and_its_id_is_unique(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1, run_id="r1")
    with pytest.raises(ConfigError, match=r"\[run\] and \[method\] only; not server"):
        submitted_config(h.config, '[server]\nbind = "tcp://*:1"\n', "x.toml")
    with pytest.raises(ConfigError, match="x.toml: run.rounds"):
        submitted_config(h.config, "[run]\nrounds = 0\n", "x.toml")
    config = submitted_config(h.config, '[run]\nrun_id = "r1"\n', "x.toml")
    assert config.server == h.config.server and config.security == h.config.security
    book = RunBook(h.ledger, tmp_path)
    with pytest.raises(ConfigError, match="run r1 exists already"):
        book.submit(config)
    h.close()
