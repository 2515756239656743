"""Result intake: what happens to a TaskResult for an open task, and to the stored ones.

:class:`ResultIntake` owns the ``updates/`` directory and the ledger's update and rejection
rows. An accepted training update is written there and recorded in the ledger *before* the
engine returns its Ack, and is folded into the method's running aggregate at once; a rejected
one is recorded with its reason and answered, but not counted. Evaluation and score results are
kept in the open phase (scores are handed to the method). After a crash, :meth:`replay` feeds
the open round's stored updates to the method again; once a round is committed its stored
updates are no longer needed and :meth:`discard` removes them.

Whether a result belongs to the open phase at all (its agent, run, round and task id) is the
engine's check; the intake sees only results the engine has routed to it. Either way the agent
is answered with :func:`ack` or :func:`refusal`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from aggregator.engine.rounds import Outgoing, Phase
from aggregator.errors import StateError, UpdateRejected
from aggregator.methods import ServerMethod
from aggregator.store.checkpoint import atomic_write_bytes
from aggregator.store.ledger import Ledger, RejectionRow, UpdateRow
from protocol.errors import ErrorCode
from protocol.frames import Decoded
from protocol.messages import Ack, ErrorReply, TaskResult

log = logging.getLogger(__name__)


def ack(run_id: str, agent_id: str, res: TaskResult) -> list[Outgoing]:
    """The answer to a result that is durable (or needs no storing): send it no more."""
    header = Ack(run_id=run_id, round=res.round, task_id=res.task_id, accepted=True)
    return [Outgoing(agent_id, header)]


def refusal(
    run_id: str, agent_id: str, res: TaskResult, code: ErrorCode, reason: str
) -> list[Outgoing]:
    """The answer to a result that is not taken, with the code and reason why."""
    header = ErrorReply(
        run_id=run_id,
        round=res.round,
        code=code,
        reason=reason,
        ref=res.msg_id,
        task_id=res.task_id,
    )
    return [Outgoing(agent_id, header)]


class ResultIntake:
    """Validates, stores and counts the results of an open phase; replays a crashed round."""

    def __init__(self, ledger: Ledger, update_dir: Path, method_name: str) -> None:
        """``update_dir``: where accepted update payloads are kept, one folder per run and
        round; ``method_name``: the run's method, as replayed results name it."""
        self.ledger = ledger
        self.update_dir = update_dir
        self.method_name = method_name

    def round_dir(self, run_id: str, round: int) -> Path:
        return self.update_dir / run_id / f"round-{round:06d}"

    def take(
        self, method: ServerMethod, phase: Phase, agent_id: str, res: TaskResult, msg: Decoded
    ) -> str | None:
        """Take ``agent_id``'s result for its open task in ``phase``, not yet answered.

        Returns None when it is taken (an Ack is due), or the reason it was rejected. Either
        way the agent counts as done in the phase.
        """
        if res.kind == "eval":
            phase.done[agent_id] = res
            phase.bytes_up[agent_id] = msg.nbytes
            return None
        if res.kind == "score":
            phase.done[agent_id] = res
            phase.bytes_up[agent_id] = msg.nbytes
            try:
                method.add_score(res.round, res, msg.blobs)  # type: ignore[attr-defined]
            except UpdateRejected as exc:
                phase.rejected += 1
                log.warning("round %d: rejected scores from %s: %s", res.round, agent_id, exc)
                return exc.reason
            return None
        try:
            update = method.validate(res.round, res, msg.blobs)
        except UpdateRejected as exc:
            phase.rejected += 1
            phase.done[agent_id] = res  # answered, just not counted
            self.ledger.record_rejection(
                RejectionRow(
                    run_id=res.run_id,
                    round=res.round,
                    task_id=res.task_id,
                    agent_id=agent_id,
                    code=str(exc.code),
                    reason=exc.reason,
                    at=time.time(),
                )
            )
            log.warning("round %d: rejected update from %s: %s", res.round, agent_id, exc.reason)
            return exc.reason
        blob = msg.blobs.get("update")
        blob_path = None
        sha = ""
        if blob is not None:
            target = self.round_dir(res.run_id, res.round)
            target.mkdir(parents=True, exist_ok=True)
            blob_path = target / f"{res.task_id}.safetensors"
            atomic_write_bytes(blob_path, blob)
            # frames.decode already checked this blob against the sha256 its header lists
            sha = next(ref.sha256 for ref in res.blobs if ref.name == "update")
        row = UpdateRow(
            run_id=res.run_id,
            round=res.round,
            task_id=res.task_id,
            agent_id=agent_id,
            sha256=sha,
            num_examples=res.num_examples,
            metrics=dict(res.metrics),
            bytes_up=msg.nbytes,
            bytes_down=phase.bytes_down.get(agent_id, 0),
            received_at=time.time(),
            blob_path=str(blob_path) if blob_path else None,
        )
        if self.ledger.record_update(row):
            method.add(update)
            log.info(
                "round %d: accepted update from %s (%d examples, %d bytes up, %d bytes down)",
                res.round, agent_id, res.num_examples, msg.nbytes, row.bytes_down,
            )  # fmt: skip
        phase.done[agent_id] = res
        phase.bytes_up[agent_id] = msg.nbytes
        return None

    def replay(self, method: ServerMethod, run_id: str, round: int) -> dict[str, TaskResult]:
        """Fold ``round``'s stored updates into ``method`` again (after a restart).

        Returns the replayed results by agent, to count those agents as done when the round's
        phase reopens. A stored payload that does not match its recorded sha256 is a
        :class:`StateError`.
        """
        replayed: dict[str, TaskResult] = {}
        rows = self.ledger.updates(run_id, round)
        for row in rows:
            if row.blob_path is None:
                continue
            data = Path(row.blob_path).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise StateError(f"stored update {row.blob_path} does not match its sha256")
            result = TaskResult(
                run_id=run_id,
                round=round,
                task_id=row.task_id,
                agent_id=row.agent_id,
                method=self.method_name,
                num_examples=row.num_examples,
                metrics=row.metrics,
            )
            method.add(method.validate(round, result, {"update": memoryview(data)}))
            replayed[row.agent_id] = result
        if rows:
            log.info("round %d: replayed %d stored updates", round, len(rows))
        return replayed

    def discard(self, run_id: str, round: int) -> None:
        """Remove a committed round's stored updates (only needed to replay it after a crash)."""
        shutil.rmtree(self.round_dir(run_id, round), True)
