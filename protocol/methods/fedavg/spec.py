"""Full-parameter FedAvg: the reference Ferret and SLoRA claim to match.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(2017), applied to every weight of the model. Each agent holds an unquantized copy of the base
in ``fedavg.dtype`` (fp32 or bf16), takes ``train.steps`` plain SGD steps (momentum 0, the
same optimizer Ferret's agents use, so the two differ only in what travels) on all of its
parameters, and sends its whole trained state; the aggregator takes the example-weighted mean
of those states as the new global model and sends it whole to every agent of the next task.

Wire:

- ``TaskAssign(kind="train", round=r)``: :class:`Params`, and from round 2 on blob ``global``:
  a ``dense`` payload (payload round ``r - 1``) with every parameter of the global model
  (``named_parameters()`` names, tied weights once, in ``fedavg.dtype``). Round 1 carries no
  blob: every agent starts from the base whose hash the task names.
- ``TaskResult`` of a train task: blob ``update``, a ``dense`` payload of round ``r`` with the
  agent's trained parameters, the same names, shapes and dtype as the global model's.
- ``TaskAssign(kind="eval", round=r)``: blob ``global`` with round ``r``'s model (none for
  round 0); its result has metrics and no blob.

Dense both ways: SmolLM2-135M is 538 MB each way per agent per round in fp32 (269 MB in
bf16); the aggregator's ``server.max_message_bytes`` must hold one update, and the server
refuses to start when it cannot.
"""

from __future__ import annotations

from typing import Literal

from protocol.methods._common import AggregationParams, EvalParams, StrictParams, TrainParams

NAME = "fedavg"
GLOBAL_BLOB = "global"
UPDATE_BLOB = "update"
PAYLOAD_SLACK = 1 << 20
"""Bytes a dense payload may take beyond its tensor data (safetensors header, message frames)."""


class FedAvgParams(StrictParams):
    dtype: Literal["fp32", "bf16"] = "fp32"
    """What the weights are held, trained and sent in (both sides). A task quantized nf4/int8
    still runs FedAvg in this dtype: every weight is trained."""


class Params(StrictParams):
    train: TrainParams = TrainParams(lr=0.01, grad_clip=1.0)
    eval: EvalParams = EvalParams()
    aggregation: AggregationParams = AggregationParams()
    fedavg: FedAvgParams = FedAvgParams()
