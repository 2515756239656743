"""Federated LoRA (FedIT): the baseline. LoRA on a quantized base, FedAvg weighted by examples.

Wire: TaskAssign(kind="train") carries :class:`Params` and, from round 2 on, the global adapter
as a ``lora`` payload in blob ``"global"`` (round 1 sends none: every agent initialises the same
adapter from ``lora.init_seed`` with the shared randomness). TaskResult carries the agent's
adapter as a ``lora`` payload in blob ``"update"``. TaskAssign(kind="eval") carries the global
adapter and :class:`EvalParams`; its TaskResult has metrics and no blob.
"""

from __future__ import annotations

from protocol.methods._common import (
    AggregationParams,
    EvalParams,
    LoraParams,
    StrictParams,
    TrainParams,
)

NAME = "fedit"
GLOBAL_BLOB = "global"
UPDATE_BLOB = "update"


class Params(StrictParams):
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    aggregation: AggregationParams = AggregationParams()
