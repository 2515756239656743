"""The worker thread: runs client methods off the link thread and turns their output into messages.

Flow of one task: the link thread :meth:`Worker.submit`\\ s a :class:`Job`; the worker runs
``client_methods()[method]().run(task, workspace)`` (one instance per method, kept), encodes a
``TaskResult`` with :func:`protocol.frames.encode`, puts it in the durable outbox and only then
hands it to the link thread through the ``outgoing`` queue. A failure becomes an ``ErrorReply``
(never stored). Heartbeats read :meth:`Worker.current` meanwhile, so they keep flowing during
long training steps.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from edge_agent.daemon.link import agent_log
from edge_agent.daemon.metrics import AgentMetrics
from edge_agent.daemon.outbox import Outbox
from edge_agent.daemon.workspace import AgentWorkspace
from edge_agent.errors import EdgeAgentError
from edge_agent.methods import ClientMethod, MethodFactory, TaskInput, TaskOutput
from edge_agent.training import truncation
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import Buffer, encode, frames_nbytes
from protocol.messages import ErrorReply, TaskAssign, TaskResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    assign: TaskAssign
    params: BaseModel
    blobs: Mapping[str, memoryview]
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Outgoing:
    """A message for the link thread; ``stored`` when the outbox holds it (a result)."""

    frames: Sequence[Buffer]
    task_id: str
    stored: bool


def task_tag(assign: TaskAssign) -> str:
    return f"task {assign.task_id} round {assign.round}"


def error_reply(assign: TaskAssign, code: ErrorCode, reason: str) -> list[Buffer]:
    reply = ErrorReply(
        run_id=assign.run_id,
        round=assign.round,
        code=code,
        reason=reason[:2000],
        ref=assign.msg_id,
        task_id=assign.task_id,
    )
    return encode(reply)


class Worker:
    """One thread, one task at a time, in the order they arrive."""

    def __init__(
        self,
        *,
        agent_id: str,
        methods: Mapping[str, MethodFactory],
        workspace: AgentWorkspace,
        outbox: Outbox,
        outgoing: queue.Queue[Outgoing],
        stop: threading.Event,
        bandwidth_limit_mbps: float | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.metrics = metrics
        self.bandwidth_limit_mbps = bandwidth_limit_mbps
        self.methods = methods
        self.workspace = workspace
        self.outbox = outbox
        self.outgoing = outgoing
        self._stop = stop
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._instances: dict[str, ClientMethod] = {}
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._running: TaskAssign | None = None
        self._thread = threading.Thread(target=self._loop, name="edgefed-worker", daemon=True)
        self.log = agent_log(logger, agent_id)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after ``stop`` is set); True if it did."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._queued.add(job.assign.task_id)
        self._jobs.put(job)

    def knows(self, task_id: str) -> bool:
        """True while ``task_id`` is queued or running."""
        with self._lock:
            running = self._running is not None and self._running.task_id == task_id
            return running or task_id in self._queued

    def current(self) -> tuple[TaskAssign, float] | None:
        """The running task and its progress (0..1), or None when idle."""
        with self._lock:
            running = self._running
        if running is None:
            return None
        return running, self.workspace.progress_fraction

    # ------------------------------------------------------------------------------- thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._lock:
                self._queued.discard(job.assign.task_id)
                if self._stop.is_set():
                    return
                self._running = job.assign
            try:
                message = self._execute(job)
            finally:
                with self._lock:
                    self._running = None
            if message is not None:
                self.outgoing.put(message)

    def _execute(self, job: Job) -> Outgoing | None:
        assign = job.assign
        tag = task_tag(assign)
        waited = time.monotonic() - job.received_at
        if waited > assign.deadline_s:
            self.log.warning("%s: deadline passed while queued (%.0f s); skipped", tag, waited)
            return self._failure(assign, ErrorCode.STALE_TASK, "deadline passed before it started")
        self.workspace.reset_progress()
        self._simulate_link(sum(b.nbytes for b in job.blobs.values()))
        self.log.info("%s: %s %s started", tag, assign.method, assign.kind)
        if self.metrics is not None:
            self.metrics.started(assign.round)
        started = time.monotonic()
        cpu_started = time.process_time()
        try:
            method = self._method(assign.method)
            with truncation.collecting() as cut:
                output = method.run(
                    TaskInput(
                        assign=assign, params=job.params, blobs=job.blobs, agent_id=self.agent_id
                    ),
                    self.workspace,
                )
            if cut.examples:
                output.metrics.update(cut.metrics())
            # CPU time of the whole process during the task: unlike the methods' wall-clock
            # "seconds", it does not grow when other work shares the machine's cores
            output.metrics.setdefault("cpu_seconds", time.process_time() - cpu_started)
            frames = self._result_frames(assign, output)
        except (EdgeAgentError, ProtocolError) as exc:
            if self._stop.is_set():
                self.log.info("%s: interrupted by shutdown (%s)", tag, exc)
                return None
            code = _code_of(exc)
            self.log.error("%s: failed: %s (%s)", tag, exc, code.value)
            return self._failure(assign, code, str(exc) or type(exc).__name__)
        except Exception as exc:
            self.log.exception("%s: crashed", tag)
            return self._failure(assign, ErrorCode.TASK_FAILED, f"{type(exc).__name__}: {exc}")
        if self._stop.is_set():
            # A method that saw should_stop() returns early with a partial result: never send it.
            self.log.info("%s: interrupted by shutdown; result discarded", tag)
            return None
        self._simulate_link(frames_nbytes(frames))
        try:
            self.outbox.put(assign.task_id, frames)
        except OSError as exc:
            self.log.error("%s: cannot store the result: %s", tag, exc.strerror or exc)
            return self._failure(
                assign, ErrorCode.RESOURCES, f"agent cannot store the result: {exc}"
            )
        seconds, nbytes = time.monotonic() - started, frames_nbytes(frames)
        self.log.info(
            "%s: done in %.1f s, %d examples, %d bytes, metrics %s",
            tag,
            seconds,
            output.num_examples,
            nbytes,
            {k: round(v, 4) for k, v in output.metrics.items()},
        )
        if self.metrics is not None:
            metrics = {str(k): float(v) for k, v in output.metrics.items()}
            self.metrics.done(assign.kind, seconds, int(output.num_examples), nbytes, metrics)
        return Outgoing(frames=frames, task_id=assign.task_id, stored=True)

    def _simulate_link(self, nbytes: int) -> None:
        """Wait as long as ``nbytes`` take at the simulated link rate (stops on shutdown)."""
        if self.bandwidth_limit_mbps is not None and nbytes:
            self._stop.wait(nbytes * 8 / (self.bandwidth_limit_mbps * 1e6))

    def _method(self, name: str) -> ClientMethod:
        instance = self._instances.get(name)
        if instance is None:
            try:
                factory = self.methods[name]
            except KeyError:
                raise _Unsupported(f"this agent does not run method {name!r}") from None
            instance = self._instances[name] = factory()
        return instance

    def _result_frames(self, assign: TaskAssign, output: TaskOutput) -> list[Buffer]:
        metrics = {str(k): float(v) for k, v in output.metrics.items()}
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise _Invalid(f"metrics are not finite: {', '.join(bad)}")
        result = TaskResult(
            run_id=assign.run_id,
            round=assign.round,
            task_id=assign.task_id,
            agent_id=self.agent_id,
            method=assign.method,
            kind=assign.kind,
            num_examples=int(output.num_examples),
            metrics=metrics,
        )
        return encode(result, output.blobs)

    def _failure(self, assign: TaskAssign, code: ErrorCode, reason: str) -> Outgoing:
        if self.metrics is not None:
            self.metrics.failed_task(assign.kind, code.value)
        return Outgoing(
            frames=error_reply(assign, code, reason), task_id=assign.task_id, stored=False
        )


class _Unsupported(EdgeAgentError):
    code = ErrorCode.UNSUPPORTED_METHOD


class _Invalid(EdgeAgentError):
    code = ErrorCode.TASK_FAILED


def _code_of(exc: BaseException) -> ErrorCode:
    code: Any = getattr(exc, "code", None)
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.TASK_FAILED
