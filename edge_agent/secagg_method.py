"""Secure aggregation around a client method: the agent's half of the stages.

:class:`SecureClient` wraps any client method. A task without ``params["secagg"]`` goes to the
wrapped method untouched. With it (see :mod:`protocol.secagg.wire`):

* ``score`` tasks run a stage of :class:`~edge_agent.secagg.SecAggClient` (advertise keys,
  share, unmask) and answer with one JSON blob;
* the ``train`` task runs the wrapped method, flattens the LoRA factors it would have sent
  (sorted by name), and sends them masked: blobs ``masked`` and ``layout``, no ``update``;
* ``excluded`` (the agent joined after the keys were agreed) fails the task with a reason.

The round's secrets live in this object only (one round at a time), never on disk: an agent
that restarts mid-round counts as dropped for that round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from edge_agent.errors import TaskError
from edge_agent.methods import ClientMethod, MethodFactory, TaskInput, TaskOutput, Workspace
from edge_agent.secagg import SecAggClient
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.secagg import wire
from protocol.secagg.errors import SecAggError
from protocol.secagg.shapes import (
    SecAggConfig,
    advert_to_params,
    request_from_params,
    roster_from_params,
    sealed_from_params,
    sealed_to_params,
)

log = logging.getLogger(__name__)


class SecureClient:
    """A client method that takes part in secure aggregation when a task asks for it."""

    def __init__(self, inner: ClientMethod) -> None:
        self.inner = inner
        self.name = inner.name
        self._session: SecAggClient | None = None

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        _, entry = wire.split_params(task.assign.params)
        if entry is None:
            return self.inner.run(task, ws)
        try:
            return self._stage(task, ws, entry)
        except SecAggError as exc:
            raise TaskError(f"secure aggregation: {exc}") from None

    def _client(self, entry: dict[str, object], *, new: bool = False) -> SecAggClient:
        context = str(entry.get("context", ""))
        if new:
            config = SecAggConfig.model_validate(entry.get("config", {}))
            self._session = SecAggClient(str(entry.get("agent", "")), context, config)
        session = self._session
        if session is None or session.context != context:
            raise SecAggError("no keys for this round (the agent restarted, or joined late)")
        return session

    def _stage(self, task: TaskInput, ws: Workspace, entry: dict[str, object]) -> TaskOutput:
        stage = entry.get("stage")
        if stage == "excluded":
            raise SecAggError("this agent is not in the round's key agreement")
        if task.assign.kind == "score":
            if stage == "advertise":
                body: object = advert_to_params(self._client(entry, new=True).advertise())
            elif stage == "share":
                roster = roster_from_params(entry.get("roster", {}))  # type: ignore[arg-type]
                body = {"sealed": sealed_to_params(self._client(entry).share(roster))}
            elif stage == "unmask":
                request = request_from_params(entry.get("request", {}))  # type: ignore[arg-type]
                body = {"revealed": sealed_to_params(self._client(entry).unmask(request))}
                self._session = None
            else:
                raise SecAggError(f"unknown stage {stage!r}")
            return TaskOutput(num_examples=0, blobs={wire.BLOB: wire.dump_json(body)})
        if task.assign.kind != "train" or stage != "mask":
            raise SecAggError(f"a {task.assign.kind} task cannot carry stage {stage!r}")
        session = self._client(entry)
        inbox = sealed_from_params(entry.get("inbox"))
        output = self.inner.run(task, ws)
        if len(output.blobs) != 1:
            raise SecAggError(f"the method sent {sorted(output.blobs)}, one LoRA payload expected")
        try:
            payload = payloads.decode(next(iter(output.blobs.values())))
        except ProtocolError as exc:
            raise SecAggError(f"the method's own payload does not decode: {exc}") from None
        layout = sorted((k, tuple(v.shape)) for k, v in payload.tensors.items())
        vector = np.concatenate(
            [payload.tensors[k].detach().to("cpu").double().numpy().reshape(-1) for k, _ in layout]
        )
        masked = session.mask(inbox, vector, weight=max(int(output.num_examples), 1))
        log.info("round %d: update masked (%d values)", task.assign.round, vector.size)
        return TaskOutput(
            num_examples=output.num_examples,
            metrics=output.metrics,
            blobs={
                wire.MASKED_BLOB: wire.vector_bytes(masked),
                wire.LAYOUT_BLOB: wire.layout_blob(layout),
            },
        )


def secure_methods(methods: Mapping[str, MethodFactory]) -> dict[str, MethodFactory]:
    """Every method factory wrapped so its tasks may take part in secure aggregation."""

    def wrap(factory: MethodFactory) -> MethodFactory:
        return lambda: SecureClient(factory())

    return {name: wrap(factory) for name, factory in methods.items()}
