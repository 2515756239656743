"""Committed rounds: the run's durable global state, and how a restart finds it again.

A training round is committed in two steps: the method's global state is checkpointed (the
:class:`~aggregator.store.checkpoint.CheckpointStore`), then the round is committed in the ledger with
its checkpoint's hash and the round's metrics. A crash between the two leaves a checkpoint the
ledger does not know of; :meth:`RoundCommits.restore` loads the newest checkpoint into the method
and finishes that commit. Opening the run is here too: its id (configured, else the ledger's
latest run, else a new one) and the check that a state dir is not reused for another method;
and the ledger's record of each evaluation of a global (and whether a restart lost one).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from aggregator.engine import crashpoints
from aggregator.engine.rounds import EVAL_KEYS, SIDE_EVAL_KEYS, Phase, RoundSummary, eval_rows
from aggregator.errors import DamagedState, StateError
from aggregator.methods import ServerMethod
from aggregator.ops.config import RunSection
from aggregator.store.checkpoint import GLOBAL_FILE, CheckpointStore
from aggregator.store.ledger import Ledger

log = logging.getLogger(__name__)

ROUND_METRICS = "edgefed.round_metrics"
"""Checkpoint metadata key: the round's metrics, so a crash between the checkpoint and the
ledger commit does not lose them (the restart finishes the commit with them)."""

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
        """Load the newest checkpoint into ``method``; its round, or None for a fresh run.

        The newest committed round's checkpoint must load, hashes checked, and be the one the
        ledger committed: else a :class:`DamagedState` that says which files to mend (falling
        back to an older checkpoint would silently undo a committed round). A newer checkpoint
        the ledger has not committed yet (a crash between the two steps) finishes its commit;
        when that one is damaged it is passed over, and the round is aggregated again from its
        stored updates, as if the crash had come before the checkpoint.
        """
        committed = self.ledger.last_committed_round(run_id)
        rounds = self.store.rounds()
        for latest in reversed(rounds):
            if committed is not None and latest < committed:
                break
            try:
                tensors, manifest, _extra = self.store.load(latest)
            except StateError as exc:
                if committed is not None and latest == committed:
                    raise self._damaged(run_id, committed, str(exc)) from exc
                log.warning(
                    "run %s: checkpoint round %d was not committed yet and cannot be read (%s); "
                    "passed over: the round is aggregated again from its stored updates",
                    run_id,
                    latest,
                    exc,
                )
                continue
            owner = manifest.meta.get("run_id")
            if owner is not None and owner != run_id:
                raise StateError(
                    f"{self.store.root}: the checkpoints there belong to run {owner}, not "
                    f"{run_id}; each run keeps its own (a serving aggregator puts a new run in "
                    "runs/<run_id>)"
                )
            sha = manifest.files.get(GLOBAL_FILE, "")
            if committed is not None and latest == committed:
                recorded = self._committed_sha(run_id, committed)
                if recorded and recorded != sha:
                    raise self._damaged(
                        run_id,
                        committed,
                        f"its checkpoint holds global sha256 {sha}, the ledger committed "
                        f"{recorded} (a checkpoint from elsewhere or another time)",
                    )
            meta = {k: v for k, v in manifest.meta.items() if k != ROUND_METRICS}
            method.restore(tensors, meta)
            if committed != latest:
                # crashed between the checkpoint and the ledger commit: finish the commit, with
                # the round's metrics the checkpoint carries
                try:
                    loaded = json.loads(manifest.meta.get(ROUND_METRICS, "{}"))
                except json.JSONDecodeError:
                    loaded = {}
                metrics = {  # finite numbers only: a value the ledger refuses must not stop
                    k: float(v)  # the restart (an older version let an agent's inf through)
                    for k, v in (loaded.items() if isinstance(loaded, dict) else ())
                    if isinstance(v, int | float) and math.isfinite(v)
                }
                self.ledger.commit_round(run_id, latest, sha, metrics, time.time())
            log.info("run %s resumes after committed round %d", run_id, latest)
            return latest
        if committed is not None:
            valid = [r for r in rounds if r < committed]
            raise self._damaged(
                run_id,
                committed,
                "its checkpoint is missing or its manifest unreadable"
                + (f" (newest valid checkpoint: round {valid[-1]})" if valid else ""),
            )
        return None

    def _committed_sha(self, run_id: str, round: int) -> str:
        rows = [r for r in self.ledger.rounds(run_id) if r.round == round]
        return (rows[0].checkpoint_sha256 or "") if rows else ""

    def _damaged(self, run_id: str, round: int, why: str) -> DamagedState:
        folder = self.store.root / f"round-{round:06d}"
        return DamagedState(
            f"run {run_id}: round {round} is committed in the ledger, but {why}; "
            f"restore {folder} from a backup and start the aggregator again (the run keeps "
            "its status and resumes; an older checkpoint is not used, since that would undo "
            "a committed round)"
        )

    def commit(
        self, method: ServerMethod, method_name: str, run_id: str, summary: RoundSummary
    ) -> None:
        """Checkpoint ``method``'s global state after round ``summary.round``, then commit
        that round in the ledger with the summary's metrics."""
        tensors, meta = method.state()
        metrics = {**summary.as_metrics(), **summary.method}
        meta = {**meta, "run_id": run_id, ROUND_METRICS: json.dumps(metrics, sort_keys=True)}
        manifest = self.store.save(summary.round, tensors, method=method_name, meta=meta)
        crashpoints.reached("commit", summary.round)
        self.ledger.commit_round(
            run_id, summary.round, manifest.files.get(GLOBAL_FILE, ""), metrics, time.time()
        )

    def lost_eval(self, run: RunSection, run_id: str, round: int, driven: bool) -> int:
        """The last committed round, when a restart lost its evaluation (0: none lost)."""
        if not run.eval or driven or round == 0:
            return 0
        rows = [r for r in self.ledger.rounds(run_id) if r.round == round]
        if rows and not any(k.startswith("eval_") for k in rows[0].metrics):
            log.info("round %d: its evaluation did not finish before the restart", round)
            return round
        return 0

    def record_eval(self, run_id: str, phase: Phase, summary: RoundSummary) -> None:
        """A closed evaluation phase in the ledger: each agent's latest evaluation (for
        ``status``), and per agent and in aggregate this evaluation of the global."""
        evals = self.ledger.get_state(run_id, "agent_evals", {})
        latest = dict(evals) if isinstance(evals, dict) else {}
        for agent_id, result in phase.done.items():
            if agent_id not in phase.refused:
                latest[agent_id] = {"round": phase.round, **result.metrics}
        self.ledger.put_state(run_id, "agent_evals", latest)
        metrics = summary.as_metrics()
        rows = eval_rows(phase)
        aggregate = {k: metrics[k] for k in EVAL_KEYS + SIDE_EVAL_KEYS if k in metrics}
        aggregate["examples"] = sum(r["examples"] for r in rows.values())
        self.ledger.record_eval(run_id, phase.round, rows, aggregate)
