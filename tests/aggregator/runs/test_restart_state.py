"""A serving aggregator restarted on damaged or changed state: a committed round whose files
are damaged stops the service with an error that names them (exit 2) and leaves the run as it
was, so that it resumes once they are mended; a config file changed between runs applies its
``[server]`` / ``[security]`` and names the ``[run]`` / ``[method]`` fields the run keeps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from engine_harness import MODEL, Harness, lora_state

from aggregator.engine.engine import RoundEngine
from aggregator.errors import DamagedState
from aggregator.methods.fedit.server import FeditServer
from aggregator.ops.config import AggregatorConfig
from aggregator.runs.lifecycle import Lifecycle
from aggregator.runs.state import RunBook
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol.messages import TaskAssign

AGENTS = ("a1", "a2")


def committed_rounds(tmp_path: Path, rounds: int, **run: Any) -> AggregatorConfig:
    """A run of 3 rounds with ``rounds`` of them committed; the harness closed (the process
    gone), its config returned."""
    h = Harness(tmp_path, rounds=3, **run)
    for agent in AGENTS:
        h.hello(agent)
    while h.engine.round < rounds:
        tasks = [o for o in h.tick() if isinstance(o.header, TaskAssign)]
        for o in tasks:
            assert isinstance(o.header, TaskAssign)
            h.result(o.header, o.agent_id, 10, lora_state(float(o.header.round)))
    config = h.config
    h.close()
    return config


def serve(tmp_path: Path) -> tuple[Lifecycle, RunBook, Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = RunBook(ledger, tmp_path)

    def build(cfg: AggregatorConfig, start: bool) -> RoundEngine:
        store = CheckpointStore(cfg.server.state_dir / "checkpoints")
        engine = RoundEngine(cfg, FeditServer(cfg.method), MODEL, ledger=ledger, store=store)
        if start:
            engine.start()
        return engine

    return Lifecycle(book, build, lambda _e: None), book, ledger


def test_a_corrupt_committed_checkpoint_stops_the_service_and_the_run_resumes_once_mended(
    tmp_path: Path,
) -> None:
    config = committed_rounds(tmp_path, 2)
    path = tmp_path / "checkpoints" / "round-000002" / "global.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-7] + b"garbage")  # bit rot, or a torn copy

    lifecycle, book, ledger = serve(tmp_path)
    with pytest.raises(DamagedState, match=r"round 2 is committed.*is corrupt.*round-000002"):
        lifecycle.adopt(config)
    assert book.info("run-t").status == "running"  # not failed: nothing is wrong with the run
    ledger.close()

    path.write_bytes(good)  # the operator restores the file
    lifecycle, book, ledger = serve(tmp_path)
    engine = lifecycle.adopt(config)
    assert (lifecycle.active, engine.round, engine.finished) == ("run-t", 2, False)
    assert book.info("run-t").status == "running"
    engine.close()
    ledger.close()


def test_a_lost_manifest_of_the_committed_round_is_not_replaced_by_an_older_round(
    tmp_path: Path,
) -> None:
    config = committed_rounds(tmp_path, 2)
    manifest = tmp_path / "checkpoints" / "round-000002" / "manifest.json"
    manifest.write_bytes(b"\x00garbage")
    lifecycle, book, ledger = serve(tmp_path)
    with pytest.raises(
        DamagedState, match=r"round 2 is committed.*newest valid checkpoint: round 1"
    ):
        lifecycle.adopt(config)
    assert book.info("run-t").status == "running"
    assert ledger.last_committed_round("run-t") == 2
    ledger.close()


def test_a_checkpoint_from_another_time_is_not_taken_for_the_committed_one(tmp_path: Path) -> None:
    config = committed_rounds(tmp_path, 2)
    ckpt = tmp_path / "checkpoints"
    # round 2's folder replaced by a copy of round 1's, renumbered: a wrong backup restored
    other = CheckpointStore(tmp_path / "other")
    tensors, manifest, _ = CheckpointStore(ckpt).load(1)
    other.save(2, tensors, method=manifest.method, meta=manifest.meta)
    for f in (ckpt / "round-000002").iterdir():
        f.write_bytes((tmp_path / "other" / "round-000002" / f.name).read_bytes())
    lifecycle, _book, ledger = serve(tmp_path)
    with pytest.raises(DamagedState, match="the ledger committed"):
        lifecycle.adopt(config)
    ledger.close()


def test_a_changed_config_file_keeps_the_runs_method_and_applies_the_services_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = committed_rounds(tmp_path, 1)
    raw = config.model_dump(mode="json")
    raw["run"]["rounds"] = 5
    raw["method"]["lora"]["r"] = 8
    raw["server"]["heartbeat_interval"] = 2.5
    changed = AggregatorConfig.model_validate(raw)

    lifecycle, _book, ledger = serve(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aggregator.runs.lifecycle"):
        engine = lifecycle.adopt(changed)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "run.rounds: started with 3, the file says 5" in warned
    assert "method.lora.r: started with 4, the file says 8" in warned
    assert "heartbeat" not in warned  # a service setting is not the run's
    assert (engine.round, engine.config.run.rounds, engine.config.method["lora"]["r"]) == (1, 3, 4)
    assert engine.config.server.heartbeat_interval == 2.5
    engine.close()
    ledger.close()

    caplog.clear()
    lifecycle, _book, ledger = serve(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aggregator.runs.lifecycle"):
        engine = lifecycle.adopt(config)  # the file as the run was started: nothing to say
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    engine.close()
    ledger.close()


def test_a_failed_or_stopped_run_resumes_after_its_last_committed_round(tmp_path: Path) -> None:
    from aggregator.errors import AggregatorError
    from aggregator.runs.admin import admin_request

    config = committed_rounds(tmp_path, 1)
    lifecycle, book, ledger = serve(tmp_path)
    engine = lifecycle.adopt(config)
    assert (lifecycle.active, engine.round) == ("run-t", 1)
    with pytest.raises(AggregatorError, match="run-t is running; only a failed or stopped"):
        admin_request(lifecycle, config, {"op": "resume", "run_id": "run-t"})

    lifecycle.fail(RuntimeError("the method raised"))  # what the service does on an engine error
    assert book.info("run-t").status == "failed" and lifecycle.active is None
    _outs, reply = admin_request(lifecycle, config, {"op": "resume", "run_id": "run-t"})
    assert reply["run"]["status"] == "queued"
    lifecycle.step(0.0)
    assert lifecycle.active == "run-t" and lifecycle.engine is not None
    assert (lifecycle.engine.round, lifecycle.engine.finished) == (1, False)
    assert book.info("run-t").status == "running"

    lifecycle.stop("run-t", "stopped by the operator")
    assert book.info("run-t").status == "stopped"
    lifecycle.resume("run-t")
    lifecycle.step(0.0)
    assert lifecycle.active == "run-t" and lifecycle.engine.round == 1
    lifecycle.engine.close()
    ledger.close()


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    from aggregator.errors import AggregatorError

    config = committed_rounds(tmp_path, 3)
    lifecycle, book, ledger = serve(tmp_path)
    lifecycle.adopt(config)
    assert book.info("run-t").status == "finished"
    with pytest.raises(AggregatorError, match="finished; .*submit a new run"):
        lifecycle.resume("run-t")
    ledger.close()


def test_a_failed_export_still_finishes_the_run_and_says_how_to_retry(tmp_path: Path) -> None:
    """The export at a run's end fails with an error that is not an OSError (safetensors'
    own, on a full export dir): the run is finished, the queue goes on, the reason says how to
    export by hand. Before, the error escaped, the run stayed running, and every restart
    crashed on the same export."""
    from safetensors import SafetensorError

    config = committed_rounds(tmp_path, 2, export_dir=str(tmp_path / "export"))
    lifecycle, book, ledger = serve(tmp_path)

    def full_disk(_engine: RoundEngine) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    lifecycle.export = full_disk
    engine = lifecycle.adopt(config)
    h = engine
    for agent in AGENTS:
        h.on_message(agent, _hello(agent), 0.0)
    tasks = [o for o in h.tick(1.0) if isinstance(o.header, TaskAssign)]
    for o in tasks:
        assert isinstance(o.header, TaskAssign)
        h.on_message(o.agent_id, _result(o.header, o.agent_id), 1.0)
    h.tick(2.0)
    lifecycle.step(2.0)
    info = book.info("run-t")
    assert info.status == "finished"
    assert "No space left on device" in info.reason
    retry = f"edgefed-aggregator export --state-dir {tmp_path} --run run-t --out {tmp_path}/export"
    assert retry in info.reason
    assert lifecycle.active is None
    ledger.close()


def _hello(agent: str):  # type: ignore[no-untyped-def]
    from engine_harness import PROFILE, SHA

    from protocol.frames import decode, encode
    from protocol.messages import Hello

    return decode(encode(Hello(agent_id=agent, versions=[1], profile=PROFILE, models=[SHA])))


def _result(t: TaskAssign, agent: str):  # type: ignore[no-untyped-def]
    from protocol import payloads
    from protocol.frames import decode, encode
    from protocol.messages import TaskResult

    blob = payloads.encode_lora(lora_state(3.0), method="fedit", round=t.round)
    res = TaskResult(run_id=t.run_id, round=t.round, task_id=t.task_id, agent_id=agent,
                     method="fedit", num_examples=10, metrics={"train_loss": 1.0})  # fmt: skip
    return decode(encode(res, {"update": blob}))


def test_a_finished_runs_config_is_not_compared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished run is not resumed: a config file that differs from it (the next run's
    settings, say) is nothing to warn about."""
    config = committed_rounds(tmp_path, 3)
    raw = config.model_dump(mode="json")
    raw["run"]["rounds"] = 5
    lifecycle, book, ledger = serve(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aggregator.runs.lifecycle"):
        lifecycle.adopt(AggregatorConfig.model_validate(raw))
    assert book.info("run-t").status == "finished"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ledger.close()
