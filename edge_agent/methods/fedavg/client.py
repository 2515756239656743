"""Full-parameter FedAvg client half: plain SGD on every weight, the whole state sent back.

The agent holds one unquantized full model per run (``ws.cache``), at the global model of
the round it was last sent (``held.round``). It is the workspace's base taken over
(``Workspace.take_base``), not a copy of it: an fp32 base loaded from safetensors maps the
file copy-on-write, so only the pages training writes become the agent's memory, and no second
513 MiB copy (SmolLM2-135M) sits beside it. A task first loads the global model from blob
``global``; round 0, the base, is read again from the agent's model (``take_base`` loads it
afresh) in the rare case the held model has been trained since: a round-0 evaluation after
training, or round 1 retried. A train task then takes
``train.steps`` SGD steps with Ferret's loop (:func:`edge_agent.methods.ferret.client.sgd_steps`,
momentum 0) and sends every parameter as one ``dense`` payload; the copy is then marked as
trained (``held.round = -1``) until the next global model arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from edge_agent.errors import PayloadRejected, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import evaluation_task, release_adapter
from edge_agent.methods.ferret.client import model_tensors, sgd_steps
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.methods.fedavg import spec

log = logging.getLogger(__name__)

CACHE_KEY = "fedavg"
_TRAINED = -1


@dataclass
class HeldModel:
    """The agent's full model of run ``key``: the global model of ``round`` (-1: trained on
    since it was sent)."""

    key: str
    model: Any
    tokenizer: Any
    tensors: dict[str, torch.Tensor]
    round: int = 0


def held_model(task: TaskInput, ws: Workspace, dtype: str) -> HeldModel:
    """This run's full model: the workspace's base, taken over once per run."""
    assign = task.assign
    key = f"{assign.run_id}|{assign.model.sha256}|{dtype}"
    held: HeldModel | None = ws.cache.get(CACHE_KEY)
    if held is not None and held.key == key:
        return held
    ws.cache.pop(CACHE_KEY, None)
    if assign.quant != dtype:
        log.info("fedavg trains every weight in %s (the task's quant %s does not apply)", dtype,
                 assign.quant)  # fmt: skip
    release_adapter(ws)  # the copy must be the plain base, not one wrapped with LoRA
    model, tokenizer = ws.take_base(assign.model, dtype)
    model.requires_grad_(True)
    held = HeldModel(key, model, tokenizer, model_tensors(model))
    ws.cache[CACHE_KEY] = held
    return held


def load_global(
    held: HeldModel,
    blobs: Mapping[str, memoryview],
    target: int,
    base: Callable[[], Mapping[str, torch.Tensor]],
) -> None:
    """Bring ``held`` to the global model of round ``target`` from the task's blobs
    (``base()``: the base's tensors, loaded again, for round 0)."""
    unexpected = set(blobs) - {spec.GLOBAL_BLOB}
    if unexpected:
        raise PayloadRejected(f"unexpected blobs {sorted(unexpected)} in a fedavg task")
    if spec.GLOBAL_BLOB in blobs:
        specs = {n: payloads.TensorSpec(tuple(t.shape), t.dtype) for n, t in held.tensors.items()}
        expect = payloads.Expect(
            kind=payloads.PayloadKind.DENSE, method=spec.NAME, round=target, tensors=specs
        )
        try:
            payload = payloads.decode(blobs[spec.GLOBAL_BLOB], expect)
        except ProtocolError as exc:
            raise PayloadRejected(f"global model rejected: {exc}") from None
        _copy_into(held, payload.tensors)
    elif target == 0:
        if held.round != 0:  # back to the base after training on it
            _copy_into(held, base())
    elif held.round != target:
        raise TaskError(f"the task brings no model and this agent does not hold round {target}'s")
    held.round = target


def _copy_into(held: HeldModel, source: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in held.tensors.items():
            tensor.copy_(source[name])


class FedAvgClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        dtype = params.fedavg.dtype
        held = held_model(task, ws, dtype)
        round_ = task.assign.round

        def base() -> dict[str, torch.Tensor]:  # a fresh load, dropped once copied
            return model_tensors(ws.take_base(task.assign.model, dtype)[0])

        if task.assign.kind == "eval":
            load_global(held, task.blobs, round_, base)
            return evaluation_task(held.model, held.tokenizer, params.eval, ws)
        load_global(held, task.blobs, round_ - 1, base)
        return self._train(task, held, params, ws)

    def _train(
        self, task: TaskInput, held: HeldModel, params: spec.Params, ws: Workspace
    ) -> TaskOutput:
        t = params.train
        round_ = task.assign.round
        started = time.perf_counter()
        held.round = _TRAINED  # from the first step on, the copy is no longer the global
        losses = sgd_steps(
            held.model,
            held.tokenizer,
            ws.train_examples,
            t,
            t.seed + round_,
            should_stop=ws.should_stop,
            on_step=lambda done: ws.report_progress(0.95 * done / t.steps),
        )
        if not losses:
            raise TaskError("stopped before the first training step")
        blob = payloads.encode_dense(held.tensors, method=self.name, round=round_)
        log.info(
            "round %d: %d SGD steps on every weight, loss %.4f → %.4f, %d bytes up",
            round_, len(losses), losses[0], losses[-1], len(blob),
        )  # fmt: skip
        return TaskOutput(
            num_examples=len(ws.train_examples),
            metrics={
                "train_loss": sum(losses) / len(losses),
                "train_loss_last": losses[-1],
                "steps": float(len(losses)),
                "seconds": time.perf_counter() - started,
            },
            blobs={spec.UPDATE_BLOB: blob},
        )


Client = FedAvgClient
