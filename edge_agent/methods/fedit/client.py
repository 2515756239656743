"""FedIT client half: load the global adapter, train LoRA locally, send the adapter back.

Round 1 carries no adapter: every agent builds the same one from ``lora.init_seed`` (shared
randomness, identical on any hardware). Evaluation tasks load the global adapter and report
loss and exact match on the agent's held-out examples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from edge_agent.errors import PayloadRejected
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import (
    attached_adapter,
    evaluation_task,
    train_task,
    training_output,
)
from edge_agent.training.lora import LoraSpec, get_adapter_state, set_adapter_state
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.methods._common import LoraParams
from protocol.methods.fedit import spec

log = logging.getLogger(__name__)


def lora_spec(lora: LoraParams) -> LoraSpec:
    return LoraSpec(
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        rank_pattern=dict(lora.rank_pattern),
    )


def peft_model_for(
    task: TaskInput, ws: Workspace, lora: LoraParams, last_layers: int | None = None
) -> tuple[Any, Any]:
    """The agent's peft model for this task's base and adapter shape, built once and reused."""
    a = task.assign
    key = ("lora", a.model.sha256, a.quant, lora.model_dump_json(), last_layers)
    return attached_adapter(ws, a, lora_spec(lora), lora.init_seed, key, last_layers=last_layers)


def load_global(
    peft_model: Any, blobs: Mapping[str, memoryview], round: int, lora: LoraParams
) -> None:
    """Set the adapter to the global one in the task (or to the seeded initial adapter)."""
    from edge_agent.training.lora import init_lora_state

    if spec.GLOBAL_BLOB in blobs:
        try:
            payload = payloads.decode(
                blobs[spec.GLOBAL_BLOB],
                payloads.Expect(kind=payloads.PayloadKind.LORA, round=round, max_rank=lora.r),
            )
        except ProtocolError as exc:
            raise PayloadRejected(f"global adapter rejected: {exc}") from None
        set_adapter_state(peft_model, payload.tensors)
    else:
        set_adapter_state(peft_model, init_lora_state(peft_model, lora_spec(lora), lora.init_seed))


class FeditClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        peft_model, tokenizer = peft_model_for(task, ws, params.lora, params.last_layers)
        load_global(peft_model, task.blobs, task.assign.round, params.lora)
        if task.assign.kind == "eval":
            return self._evaluate(peft_model, tokenizer, params, ws)
        result = train_task(peft_model, tokenizer, ws, params.train, task.assign.round)
        state = get_adapter_state(peft_model)
        blob = payloads.encode_lora(state, method=self.name, round=task.assign.round)
        log.info(
            "round %d: trained %d steps, loss %.4f → %.4f",
            task.assign.round,
            result.steps,
            result.first_loss,
            result.last_loss,
        )
        return training_output(result, {spec.UPDATE_BLOB: blob})

    def _evaluate(
        self, peft_model: Any, tokenizer: Any, params: spec.Params, ws: Workspace
    ) -> TaskOutput:
        return evaluation_task(peft_model, tokenizer, params.eval, ws)


Client = FeditClient
