"""Secure aggregation and DP around a client method: the agent's half of both.

:class:`SecureClient` wraps any client method. A task without ``params["secagg"]`` goes to the
wrapped method untouched. With it (see :mod:`protocol.secagg.wire`):

* ``score`` tasks run a stage of :class:`~edge_agent.privacy.secagg.SecAggClient` (advertise keys,
  share, unmask) and answer with one JSON blob;
* the ``train`` task runs the wrapped method, flattens the tensors it would have sent
  (sorted by name; Ferret's triples become the dense (group, seed) coefficient grid of
  :mod:`protocol.methods.ferret.grid`, clamped to ``ferret.clip_norm``), and sends them
  masked: blobs ``masked`` and ``layout``, no ``update``;
* ``excluded`` (the agent joined after the keys were agreed) fails the task with a reason.

With ``params["dp"]`` (:mod:`protocol.privacy`) the train task's adapter is clipped and noised
(:mod:`edge_agent.privacy.dp`) before it is masked or sent.

The round's secrets live in this object only (one round at a time), never on disk: an agent
that restarts mid-round counts as dropped for that round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch

from edge_agent.errors import TaskError
from edge_agent.methods import ClientMethod, MethodFactory, TaskInput, TaskOutput, Workspace
from edge_agent.privacy.dp import clip_and_noise
from edge_agent.privacy.secagg import SecAggClient
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.privacy import dp_entry
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
        dp = dp_entry(task.assign.params)
        if entry is None and dp is None:
            return self.inner.run(task, ws)
        try:
            if entry is not None and (
                task.assign.kind == "score" or entry.get("stage") == "excluded"
            ):
                return self._stage(task, entry)
            if task.assign.kind != "train":
                return self.inner.run(task, ws)
            return self._train(task, ws, entry, dp)
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

    def _stage(self, task: TaskInput, entry: dict[str, object]) -> TaskOutput:
        stage = entry.get("stage")
        if stage == "excluded":
            raise SecAggError("this agent is not in the round's key agreement")
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
            raise SecAggError(f"unknown stage {stage!r} for a {task.assign.kind} task")
        return TaskOutput(num_examples=0, blobs={wire.BLOB: wire.dump_json(body)})

    def _train(
        self,
        task: TaskInput,
        ws: Workspace,
        entry: dict[str, object] | None,
        dp: tuple[float, float] | None,
    ) -> TaskOutput:
        if entry is not None and entry.get("stage") != "mask":
            raise SecAggError(f"a train task cannot carry stage {entry.get('stage')!r}")
        session = self._client(entry) if entry is not None else None
        reference = reference_adapter(task, ws) if dp is not None else None
        output = self.inner.run(task, ws)
        if len(output.blobs) != 1:
            raise SecAggError(f"the method sent {sorted(output.blobs)}, one LoRA payload expected")
        blob_name, blob = next(iter(output.blobs.items()))
        try:
            payload = payloads.decode(blob)
        except ProtocolError as exc:
            raise SecAggError(f"the method's own payload does not decode: {exc}") from None
        tensors = dict(payload.tensors)
        metrics = dict(output.metrics)
        if dp is not None and reference is not None:
            tensors, scale = clip_and_noise(tensors, reference, *dp)
            metrics["dp_clip_scale"] = scale
        if session is None or entry is None:  # DP alone: the same payload, clipped and noised
            data = payloads.encode_lora(tensors, method=self.name, round=task.assign.round)
            return TaskOutput(output.num_examples, metrics, {blob_name: data})
        inbox = sealed_from_params(entry.get("inbox"))
        if payload.kind is payloads.PayloadKind.SEEDCOEF:  # Ferret: the dense coefficient grid
            vector, layout = ferret_grid(task, payload, metrics)
        else:
            entries = sorted((k, tuple(v.shape)) for k, v in tensors.items())
            layout = wire.Layout(entries, payload.kind.value, payloads.caller_meta(payload.meta))
            vector = np.concatenate(
                [tensors[k].detach().to("cpu").double().numpy().reshape(-1) for k, _ in entries]
            )
        # DP-FedAvg weighs every agent alike; plain FedAvg by examples; a result that carries
        # no update (Ferret out of sync) weighs nothing
        weight = wire.masked_weight(output.num_examples, metrics, dp=dp is not None)
        masked = session.mask(inbox, vector, weight=weight)
        log.info("round %d: update masked (%d values)", task.assign.round, vector.size)
        return TaskOutput(
            num_examples=output.num_examples,
            metrics=metrics,
            blobs={
                wire.MASKED_BLOB: wire.vector_bytes(masked),
                wire.LAYOUT_BLOB: wire.layout_blob(layout),
            },
        )


def ferret_grid(
    task: TaskInput, payload: payloads.Payload, metrics: dict[str, float]
) -> tuple[npt.NDArray[np.float64], wire.Layout]:
    """Ferret's triples as the dense (group, seed) grid every agent of the round shares, each
    coefficient clamped to ``ferret.clip_norm`` as the server would (it cannot: it sees only
    the sum); the count clamped goes into ``metrics`` as the plain server reports it."""
    from protocol.methods.ferret import grid

    ferret = getattr(task.params, "ferret", None)
    if ferret is None:
        raise SecAggError(f"a seedcoef payload from {task.assign.method}, not ferret")
    k, n_groups, base_seed = payload.k, payload.n_groups, payload.base_seed
    if k is None or n_groups is None or base_seed is None:
        raise SecAggError("a seedcoef payload without its pool (K, groups, base seed)")
    if k != ferret.k:
        raise SecAggError(f"the payload's K {k} is not the task's {ferret.k}")
    t = payload.tensors
    try:
        vector, clipped = grid.dense_grid(
            t["group"], t["seed"], t["value"], n_groups=n_groups, k=k, clip_norm=ferret.clip_norm
        )
    except ValueError as exc:
        raise SecAggError(f"the coefficients do not fit the grid: {exc}") from None
    if clipped:
        metrics["clipped_coefficients"] = float(clipped)
    return vector, grid.grid_layout(base_seed, k, n_groups)


def reference_adapter(task: TaskInput, ws: Workspace) -> dict[str, torch.Tensor]:
    """The adapter this training task starts from: the global one it carries, or (round 1)
    the seeded initial adapter every agent builds alike. DP clips the change from it."""
    from edge_agent.methods.fedit.client import lora_spec, peft_model_for
    from edge_agent.training.lora import init_lora_state

    if "global" in task.blobs:
        try:
            return dict(payloads.decode(task.blobs["global"]).tensors)
        except ProtocolError as exc:
            raise SecAggError(f"the global adapter does not decode: {exc}") from None
    lora = getattr(task.params, "lora", None)
    if lora is None:
        raise SecAggError(f"differential privacy needs a LoRA method, not {task.assign.method}")
    model, _ = peft_model_for(task, ws, lora, getattr(task.params, "last_layers", None))
    return init_lora_state(model, lora_spec(lora), lora.init_seed)


def secure_methods(methods: Mapping[str, MethodFactory]) -> dict[str, MethodFactory]:
    """Every method factory wrapped so its tasks may take part in secure aggregation and DP."""

    def wrap(factory: MethodFactory) -> MethodFactory:
        return lambda: SecureClient(factory())

    return {name: wrap(factory) for name, factory in methods.items()}
