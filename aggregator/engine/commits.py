"""Committed rounds: the run's durable global state, and how a restart finds it again.

A training round is committed in two steps: the method's global state is checkpointed (the
:class:`~aggregator.store.checkpoint.CheckpointStore`), then the round is committed in the ledger with
its checkpoint's hash and the round's metrics. A crash between the two leaves a checkpoint the
ledger does not know of; :meth:`RoundCommits.restore` loads the newest checkpoint into the method
and finishes that commit. Opening the run is here too: its id (configured, else the ledger's
latest run, else a new one) and the check that a state dir is not reused for another method.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aggregator.engine.rounds import RoundSummary
from aggregator.errors import StateError
from aggregator.methods import ServerMethod
from aggregator.ops.config import RunSection
from aggregator.store.checkpoint import GLOBAL_FILE, CheckpointStore
from aggregator.store.ledger import Ledger

log = logging.getLogger(__name__)

"""The checkpoint file whose sha256 the ledger's commit records."""


class RoundCommits:
    """Opens a run in the ledger, commits its rounds, and restores the last one committed."""

    def __init__(self, ledger: Ledger, store: CheckpointStore) -> None:
        self.ledger = ledger
        self.store = store

    def open_run(self, run: RunSection, config: dict[str, Any]) -> str:
        """The run id to carry on (or start), recorded in the ledger with ``config``.

        A :class:`StateError` when the state dir holds that run for another method.
        """
        run_id = run.run_id or self.ledger.latest_run() or f"run-{int(time.time())}"
        existing = self.ledger.run(run_id)
        if existing is not None and existing.get("method") != run.method:
            raise StateError(
                f"state dir holds run {run_id} of method {existing.get('method')}, "
                f"not {run.method}; use another state_dir or run_id"
            )
        self.ledger.create_run(run_id, run.method, config)
        return run_id

    def restore(self, method: ServerMethod, run_id: str) -> int | None:
        """Load the newest checkpoint into ``method``; its round, or None for a fresh run."""
        latest = self.store.latest()
        if latest is None:
            return None
        tensors, manifest, _extra = self.store.load(latest)
        method.restore(tensors, manifest.meta)
        if self.ledger.last_committed_round(run_id) != latest:
            # crashed between the checkpoint and the ledger commit: finish the commit
            sha = manifest.files.get(GLOBAL_FILE, "")
            self.ledger.commit_round(run_id, latest, sha, {}, time.time())
        log.info("run %s resumes after committed round %d", run_id, latest)
        return latest

    def commit(
        self, method: ServerMethod, method_name: str, run_id: str, summary: RoundSummary
    ) -> None:
        """Checkpoint ``method``'s global state after round ``summary.round``, then commit
        that round in the ledger with the summary's metrics."""
        tensors, meta = method.state()
        manifest = self.store.save(
            summary.round, tensors, method=method_name, meta={**meta, "run_id": run_id}
        )
        self.ledger.commit_round(
            run_id,
            summary.round,
            manifest.files.get(GLOBAL_FILE, ""),
            {**summary.as_metrics(), **summary.method},
            time.time(),
        )
