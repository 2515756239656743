"""The runs of a long-lived service: their lifecycle in the ledger, their queue, their folders.

A run's lifecycle is kept in the ledger's ``state`` table (key ``lifecycle``), next to its row
in ``runs``; its whole history (rounds, updates, checkpoints) stays after it ends::

    queued ──▶ running ──▶ finished
       │          ├──────▶ failed   (reason: the error that ended it)
       └──────────┴──────▶ stopped  (reason: who stopped it)

One run is active at a time (a second one would share the agents and the socket's send
queues; the engine is written for one); the others wait in the queue in submission order.
The run of ``serve``'s own config file is the first one submitted.

A run's folder (key ``dir``, relative to the state dir) holds its checkpoints, its stored
updates and its method's files. The first run of a state dir uses the state dir itself (where
single-run state dirs always kept them); every later run gets ``runs/<run_id>/``, so runs never
share a checkpoint. The ledger (``ledger.sqlite``) and the admin socket stay at the top.
"""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from aggregator.errors import ConfigError, StateError
from aggregator.ops.config import AggregatorConfig, build_config
from aggregator.store.ledger import Ledger

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "finished", "failed", "stopped"]
ENDED: frozenset[str] = frozenset({"finished", "failed", "stopped"})
LIFECYCLE = "lifecycle"
DIR = "dir"
SERVICE = "service"
"""State key of what the active run is doing now (running / waiting for whom since when)."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    method: str
    status: Status
    reason: str
    created_at: float
    changed_at: float
    directory: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "created_at": self.created_at,
            "changed_at": self.changed_at,
            "dir": str(self.directory),
        }


class RunBook:
    """Reads and writes run lifecycles in ``ledger``; ``state_dir`` is the service's."""

    def __init__(self, ledger: Ledger, state_dir: Path) -> None:
        self.ledger = ledger
        self.state_dir = Path(state_dir)

    # --- folders ----------------------------------------------------------------------------

    def directory(self, run_id: str) -> Path:
        """The folder of ``run_id``'s checkpoints and files; chosen (and recorded) on first use."""
        recorded = self.ledger.get_state(run_id, DIR)
        if isinstance(recorded, str):
            return self.state_dir / recorded
        others = [r for r in self.ledger.run_ids() if r != run_id]
        # a run recorded before runs had folders used the state dir itself
        top_taken = any(self.ledger.get_state(r, DIR, ".") == "." for r in others)
        relative = f"runs/{run_id}" if top_taken else "."
        self.ledger.put_state(run_id, DIR, relative)
        return self.state_dir / relative

    def run_config(self, config: AggregatorConfig, run_id: str) -> AggregatorConfig:
        """``config`` with ``server.state_dir`` set to the run's folder (engine and method
        write there)."""
        folder = self.directory(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        server = config.server.model_copy(update={"state_dir": folder})
        run = config.run.model_copy(update={"run_id": run_id})
        return config.model_copy(update={"server": server, "run": run})

    # --- lifecycle --------------------------------------------------------------------------

    def submit(self, config: AggregatorConfig) -> str:
        """Queue a run (its config already merged with the service's); its id. A
        :class:`ConfigError` when the id is taken."""
        run_id = config.run.run_id or f"run-{int(time.time() * 1000)}"
        if self.ledger.run(run_id) is not None:
            raise ConfigError(f"run {run_id} exists already; give the new run another run_id")
        self.ledger.create_run(run_id, config.run.method, config.model_dump(mode="json"))
        self.set(run_id, "queued", "submitted")
        log.info("run %s (%s, %d rounds) queued", run_id, config.run.method, config.run.rounds)
        return run_id

    def set(self, run_id: str, status: Status, reason: str = "") -> None:
        old = self.ledger.get_state(run_id, LIFECYCLE)
        since = old.get("since", time.time()) if isinstance(old, dict) else time.time()
        value = {"status": status, "reason": reason, "at": time.time(), "since": since}
        self.ledger.put_state(run_id, LIFECYCLE, value)

    def info(self, run_id: str) -> RunInfo:
        row = self.ledger.run(run_id)
        if row is None:
            raise StateError(f"no run {run_id!r} in {self.state_dir}")
        life = self.ledger.get_state(run_id, LIFECYCLE)
        if not isinstance(life, dict):  # a run of a single-run service: finished or resumable
            done = self.ledger.last_committed_round(run_id) or 0
            rounds = int(row["config"].get("run", {}).get("rounds", 0))
            life = {"status": "finished" if rounds and done >= rounds else "running", "at": 0.0}
        recorded = self.ledger.get_state(run_id, DIR, ".")
        return RunInfo(
            run_id=run_id,
            method=str(row["method"]),
            status=cast(Status, life["status"]),
            reason=str(life.get("reason", "")),
            created_at=float(row["created_at"]),
            changed_at=float(life.get("at", 0.0)),
            directory=self.state_dir / str(recorded),
        )

    def all(self) -> list[RunInfo]:
        """Every run, oldest first."""
        return [self.info(r) for r in self.ledger.run_ids()]

    def next_run(self) -> str | None:
        """The run to make active: one left running by a crash, else the oldest queued."""
        infos = self.all()
        for want in ("running", "queued"):
            for info in infos:
                if info.status == want:
                    return info.run_id
        return None

    def config_of(self, run_id: str) -> AggregatorConfig:
        row = self.ledger.run(run_id)
        if row is None:
            raise StateError(f"no run {run_id!r} in {self.state_dir}")
        return build_config(row["config"], source=f"run {run_id}")


def submitted_config(
    service: AggregatorConfig, run_toml: str, source: str, base: Path | None = None
) -> AggregatorConfig:
    """A run file (its ``[run]`` and ``[method]`` tables) on top of the service's config (its
    ``[server]`` and ``[security]``); every error reported at once as a :class:`ConfigError`.
    Relative paths of the run file resolve against ``base`` (the run file's folder)."""
    try:
        raw = tomllib.loads(run_toml)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    extra = sorted(set(raw) - {"run", "method"})
    if extra:
        raise ConfigError(
            f"{source}: a run file holds [run] and [method] only; not {', '.join(extra)} "
            "(the service's [server] and [security] apply to every run)"
        )
    fixed = service.model_dump(mode="json", exclude={"run", "method", "upstream"})
    merged = {**fixed, "run": raw.get("run", {}), "method": raw.get("method", {})}
    return build_config(merged, source=source, base=base)
