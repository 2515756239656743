"""Result intake: what happens to a TaskResult for an open task, and to the stored ones.

:class:`ResultIntake` owns the ``updates/`` directory and the ledger's update and rejection
rows. Accepted training updates are taken in groups (durable group commit): :meth:`take`
validates an update, folds it into the method's running aggregate (``method.add``: a large
update is summed on a helper thread meanwhile) and appends a record of it (its ledger row and
its payload) to the round's update log (:mod:`aggregator.store.updatelog`); :meth:`commit` then
syncs the log once (the group's one durable point), records the group's ledger rows in one
transaction that does not sync, and only then are their Acks due. The aggregate is in memory
only: a crash loses it with everything not yet durable, and a failed write or sync stops the
service (a StateError); a restart rebuilds it from what is durable, so nothing is counted that
was not acknowledged or about to be. The service overlaps a group's sync with taking the next:
:meth:`seal` starts the sync on the log's appender thread, :meth:`finish` waits for it and
records the group (the same steps, in the same order). Outside a group the engine commits each
update at once (a group of one). A rejected update (by ``validate`` or ``add``) is recorded with
its reason and answered, but neither counted nor stored. Evaluation and score results are kept in
the open phase (scores are handed to the method). After a crash, :meth:`recover` rebuilds the
ledger rows that the log holds and the ledger lost, and :meth:`replay` feeds the open round's
stored updates to the method again; once a round is committed its stored updates are no longer
needed and :meth:`discard` removes them.

Whether a result belongs to the open phase at all (its agent, run, round and task id) is the
engine's check; the intake sees only results the engine has routed to it. Either way the agent
is answered with :func:`ack` or :func:`refusal`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aggregator.engine import crashpoints
from aggregator.engine.rounds import Outgoing, Phase, metrics_problem
from aggregator.errors import DamagedState, StateError, UpdateRejected
from aggregator.methods import ServerMethod
from aggregator.store.ledger import Ledger, RejectionRow, UpdateRow
from aggregator.store.updatelog import LOG_NAME, LoggedRecord, UpdateLog, read_slice, scan, truncate
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import Decoded
from protocol.messages import Ack, ErrorReply, TaskResult

log = logging.getLogger(__name__)

INTERNAL = "internal error; see the aggregator log"


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


_BLOB = "blob"
"""A log record's key: whether its payload is the update's blob (else the row has none)."""
_WHERE = ("blob_path", "blob_offset", "blob_length")
"""The row's fields that say where its payload lies: the log's record gives them."""
_ROW_KEYS = frozenset(f.name for f in dataclasses.fields(UpdateRow)) - frozenset(_WHERE)
"""What a record's row holds besides :data:`_BLOB`."""


def _row(fields: dict[str, Any], path: Path, offset: int, length: int, blob: bool) -> UpdateRow:
    """The ledger row of a record: its fields, and where its payload lies if it has one."""
    if not blob:
        return UpdateRow(**fields)
    return UpdateRow(**fields, blob_path=str(path), blob_offset=offset, blob_length=length)


def _logged_row(rec: LoggedRecord, path: Path) -> UpdateRow | None:
    """The ledger row a log record holds (None: not a row this version writes)."""
    fields = dict(rec.row)
    has_blob = fields.pop(_BLOB, None)
    if set(fields) != _ROW_KEYS or not isinstance(has_blob, bool):
        return None
    if not has_blob and rec.length != 0:
        return None
    try:
        return _row(fields, path, rec.offset, rec.length, has_blob)
    except TypeError:
        return None


def _payload_matches(path: Path, row: UpdateRow) -> bool:
    if row.blob_offset is None or row.blob_length is None:
        return True
    data = read_slice(path, row.blob_offset, row.blob_length)
    return hashlib.sha256(data).hexdigest() == row.sha256


def stored_payload(row: UpdateRow) -> bytes:
    """The payload a ledger row names: a slice of its round's update log, or (written before
    the log) a file of its own. Not checked against the row's sha256 here."""
    if row.blob_path is None:
        raise StateError(f"task {row.task_id} has no stored payload")
    try:
        if row.blob_offset is None or row.blob_length is None:
            return Path(row.blob_path).read_bytes()
        return read_slice(Path(row.blob_path), row.blob_offset, row.blob_length)
    except OSError as exc:
        raise DamagedState(
            f"the stored update of task {row.task_id} (round {row.round}, agent "
            f"{row.agent_id}) cannot be read from {row.blob_path}: {exc.strerror or exc}; "
            "restore that file and start the aggregator again"
        ) from exc


def wait_synced(syncs: list[Future[None]]) -> None:
    """Wait for a sealed group's log syncs (raising a failed one's error)."""
    for sync in syncs:
        sync.result()


class ResultIntake:
    """Validates, stores and counts the results of an open phase; replays a crashed round."""

    def __init__(self, ledger: Ledger, update_dir: Path, method_name: str) -> None:
        """``update_dir``: where accepted update payloads are kept, one folder per run and
        round; ``method_name``: the run's method, as replayed results name it."""
        self.ledger = ledger
        self.update_dir = update_dir
        self.method_name = method_name
        self.pending: list[tuple[UpdateRow, TaskResult]] = []
        """The group taken but not committed: no Ack is due for any of it yet."""
        self.sealed: tuple[list[tuple[UpdateRow, TaskResult]], list[Future[None]]] | None
        self.sealed = None
        """A group whose log sync is under way (:meth:`seal`), and the syncs; no Ack is due
        for it until :meth:`finish` has seen them done and recorded it."""
        self._logs: dict[tuple[str, int], UpdateLog] = {}

    def round_dir(self, run_id: str, round: int) -> Path:
        return self.update_dir / run_id / f"round-{round:06d}"

    def take(
        self, method: ServerMethod, phase: Phase, agent_id: str, res: TaskResult, msg: Decoded
    ) -> str | None:
        """Take ``agent_id``'s result for its open task in ``phase``, not yet answered.

        Returns None when it is taken, or the reason it was rejected. Either way the agent
        counts as done in the phase. A taken training update is pending (:meth:`is_pending`)
        until :meth:`commit`; its Ack is due only then. Evaluations and scores need no storing:
        their Ack is due at once.
        """
        problem = metrics_problem(res, phase.limits.get(agent_id))
        if problem is not None:
            phase.bytes_up[agent_id] = msg.nbytes
            return self._reject(phase, agent_id, res, ErrorCode.REJECTED_UPDATE, problem)
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
                phase.refused.add(agent_id)
                log.warning("round %d: rejected scores from %s: %s", res.round, agent_id, exc)
                return exc.reason
            return None
        try:
            update = method.validate(res.round, res, msg.blobs)
        except UpdateRejected as exc:
            return self._reject(phase, agent_id, res, exc.code, exc.reason)
        # folded into the running aggregate now (a large update on the method's helper thread,
        # while this one is stored and the next ones are taken): the aggregate lives in memory
        # only, and a crash or a failed write (a StateError: the service stops) loses it with
        # everything else not yet durable; a restart replays what the ledger and the log hold
        try:
            method.add(update)
        except StateError:
            raise
        except (UpdateRejected, ProtocolError) as exc:
            return self._reject(phase, agent_id, res, exc.code, str(exc))
        except Exception:  # a bug an update can reach: it fails, the group goes on
            log.exception("round %d: %s's update could not be added", res.round, agent_id)
            return self._reject(phase, agent_id, res, ErrorCode.INTERNAL, INTERNAL)
        blob = msg.blobs.get("update")
        fields: dict[str, Any] = {
            "run_id": res.run_id,
            "round": res.round,
            "task_id": res.task_id,
            "agent_id": agent_id,
            # frames.decode already checked the blob against the sha256 its header lists
            "sha256": next(ref.sha256 for ref in res.blobs if ref.name == "update")
            if blob is not None
            else "",
            "num_examples": res.num_examples,
            "metrics": dict(res.metrics),
            "bytes_up": msg.nbytes,
            "bytes_down": phase.bytes_down.get(agent_id, 0),
            "received_at": time.time(),
        }
        # the record holds the ledger row too: the log's sync is the group's one durable point
        log_ = self._log(res.run_id, res.round)
        offset, length = log_.append({**fields, _BLOB: blob is not None}, blob or b"")
        row = _row(fields, log_.path, offset, length, blob is not None)
        self.pending.append((row, res))
        phase.done[agent_id] = res
        phase.bytes_up[agent_id] = msg.nbytes
        return None

    def _reject(
        self, phase: Phase, agent_id: str, res: TaskResult, code: ErrorCode | str, reason: str
    ) -> str:
        """Record ``res`` as rejected (answered, not counted, not stored); the reason."""
        phase.refused.add(agent_id)
        phase.done[agent_id] = res  # answered, just not counted
        self.ledger.record_rejection(
            RejectionRow(
                run_id=res.run_id,
                round=res.round,
                task_id=res.task_id,
                agent_id=agent_id,
                code=str(code),
                reason=reason,
                at=time.time(),
            )
        )
        log.warning("round %d: rejected update from %s: %s", res.round, agent_id, reason)
        return reason

    def is_pending(self, task_id: str) -> bool:
        """Whether ``task_id``'s update is taken but not yet recorded (pending or sealed)."""
        group = self.pending + (self.sealed[0] if self.sealed is not None else [])
        return any(row.task_id == task_id for row, _ in group)

    def seal(self) -> None:
        """Start making the pending group durable without waiting: its log sync runs on the
        log's appender thread while the next group is taken (after the appends queued before
        it, so it covers exactly what was taken so far). :meth:`finish` (or :meth:`commit`)
        records and counts it once the sync is done. Finish the group sealed before first."""
        if self.sealed is not None:
            raise StateError("a sealed group is not finished yet")
        if not self.pending:
            return
        group, self.pending = self.pending, []
        self.sealed = (group, [log_.sync_async() for log_ in self._logs.values() if log_.dirty])

    def synced(self) -> bool:
        """Whether the sealed group's sync has returned (or nothing is sealed): :meth:`finish`
        would not wait."""
        return self.sealed is None or all(sync.done() for sync in self.sealed[1])

    def finish(self, run_id: str) -> list[Outgoing]:
        """Wait for the sealed group's sync, then record it as :meth:`commit` does; the Acks
        now due ([] when nothing is sealed)."""
        if self.sealed is None:
            return []
        (group, syncs), self.sealed = self.sealed, None
        wait_synced(syncs)
        return self._count(run_id, group)

    def commit(self, run_id: str) -> list[Outgoing]:
        """Make the pending group durable and record it: one sync of the round's log, then one
        ledger transaction (a sealed group first, see :meth:`finish`). Returns the Acks now
        due, one for every update of the group."""
        out = self.finish(run_id)
        if not self.pending:
            return out
        group, self.pending = self.pending, []
        for log_ in self._logs.values():
            log_.sync()
        return out + self._count(run_id, group)

    def _count(self, run_id: str, group: list[tuple[UpdateRow, TaskResult]]) -> list[Outgoing]:
        """A group whose records are durable: its ledger rows, then its Acks (its updates were
        folded into the aggregate when :meth:`take` took them)."""
        crashpoints.reached("group", group[0][0].round)
        # durable already (the log holds the rows): the transaction needs no sync of its own
        inserted = self.ledger.record_updates([row for row, _ in group], sync=False)
        out: list[Outgoing] = []
        for (row, res), new in zip(group, inserted, strict=True):
            if not new:  # take() refuses a task id that is pending or recorded: a bug
                raise StateError(
                    f"round {row.round}: task {row.task_id} was recorded already, yet counted "
                    "again; restart to replay the round from what is durable"
                )
            log.info(
                "round %d: accepted update from %s (%d examples, %d bytes up, %d bytes down)",
                row.round, row.agent_id, row.num_examples, row.bytes_up, row.bytes_down,
            )  # fmt: skip
            out += ack(run_id, row.agent_id, res)
        return out

    def open_log(self, run_id: str, round: int) -> None:
        """Open ``round``'s update log before its first update arrives (creating a file costs
        a sync of its folder: not on an update's path to its Ack)."""
        self._log(run_id, round)

    def _log(self, run_id: str, round: int) -> UpdateLog:
        key = (run_id, round)
        log_ = self._logs.get(key)
        if log_ is None:
            for old in self._logs.values():  # a round's log is done with once another opens
                if not old.dirty:
                    old.close()
            self._logs = {k: v for k, v in self._logs.items() if v.dirty}
            log_ = self._logs[key] = UpdateLog(self.round_dir(run_id, round) / LOG_NAME)
        return log_

    def close(self) -> None:
        for log_ in self._logs.values():
            log_.close()
        self._logs = {}

    def replay(self, method: ServerMethod, run_id: str, round: int) -> dict[str, TaskResult]:
        """Fold ``round``'s stored updates into ``method`` again (after a restart).

        Returns the replayed results by agent, to count those agents as done when the round's
        phase reopens. A stored payload that does not match its recorded sha256 is a
        :class:`StateError`.
        """
        replayed: dict[str, TaskResult] = {}
        self.recover(run_id, round)
        rows = self.ledger.updates(run_id, round)
        for row in rows:
            if row.blob_path is None:
                continue
            data = stored_payload(row)
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise DamagedState(
                    f"stored update {row.blob_path} (task {row.task_id}) does not match its "
                    "sha256; restore that file and start the aggregator again"
                )
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

    def recover(self, run_id: str, round: int) -> int:
        """Rebuild the ledger rows of ``round`` that its update log holds and the ledger lost
        (a power cut after a group's log sync: its transaction was not synced); the number
        rebuilt. The log is cut at its first record that is not whole or whose payload does
        not match its sha256: that record and those after it were never acknowledged (their
        group's sync had not returned). Call before the round's log is opened for appending."""
        path = self.round_dir(run_id, round) / LOG_NAME
        records, end = scan(path)
        if records and not any(r.round == round for r in self.ledger.rounds(run_id)):
            # a ledger older than the log (restored from a backup?): leave the log alone
            log.warning("round %d: an update log but no such round in the ledger: %s", round, path)
            return 0
        known = {row.task_id for row in self.ledger.updates(run_id, round)}
        lost: list[UpdateRow] = []
        for rec in records:
            row = _logged_row(rec, path)
            if row is None or (row.task_id not in known and not _payload_matches(path, row)):
                log.warning(
                    "round %d: the update log %s is cut at byte %d (a group that was never "
                    "acknowledged)", round, path, rec.start,
                )  # fmt: skip
                end = rec.start
                break
            if row.task_id not in known and row.run_id == run_id and row.round == round:
                lost.append(row)
                known.add(row.task_id)
        if path.exists() and path.stat().st_size != end:
            truncate(path, end)
        if lost:
            self.ledger.record_updates(lost)  # synced
            log.warning(
                "round %d: %d updates rebuilt from the update log into the ledger (their "
                "group was synced; its ledger transaction was lost or never ran)",
                round, len(lost),
            )  # fmt: skip
        return len(lost)

    def discard(self, run_id: str, round: int) -> None:
        """Remove a committed round's stored updates (only needed to replay it after a crash)."""
        log_ = self._logs.pop((run_id, round), None)
        if log_ is not None:
            log_.close()
        shutil.rmtree(self.round_dir(run_id, round), True)
