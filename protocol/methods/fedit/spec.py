"""Federated LoRA (FedIT): the baseline. LoRA on a quantized base, FedAvg weighted by examples.

Wire: TaskAssign(kind="train") carries :class:`Params` and, from round 2 on, the global adapter
as a ``lora`` payload in blob ``"global"`` (round 1 sends none: every agent initialises the same
adapter from ``lora.init_seed`` with the shared randomness). TaskResult carries the agent's
adapter as a ``lora`` payload in blob ``"update"``. TaskAssign(kind="eval") carries the global
adapter and :class:`EvalParams`; its TaskResult has metrics and no blob. With ``last_layers``
set, the adapter covers only the last that many decoder layers of the base (names as peft's,
with those layers' indices).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

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
    last_layers: Annotated[int, Field(ge=1, le=1024)] | None = None
    """LoRA on the last this many decoder layers only (peft's ``layers_to_transform``); None:
    every layer. FedBiOT's baseline of the same trainable capacity: ``last_layers=2``."""
