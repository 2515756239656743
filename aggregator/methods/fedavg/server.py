"""Full-parameter FedAvg server half: the example-weighted mean of the agents' whole models.

The server holds the global model (the base from ``run.model_dir`` in ``fedavg.dtype``, then
each round's mean). An update is the agent's whole trained state as a ``dense`` payload whose
names, shapes and dtype must be the global model's; the mean is
:class:`aggregator.methods.robust.Aggregator`'s (a float64 running sum for ``fedavg``, or a trimmed
mean or median), and ``aggregation.clip_norm`` bounds ``‖state − global‖`` first. The new
global model is the mean, cast to ``fedavg.dtype``. The checkpoint is the whole model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.methods import Assignment, MethodContext, Update, decode_update
from aggregator.methods._full_model import write_full_model
from aggregator.methods.ferret.server import load_base_weights
from aggregator.methods.robust import Aggregator, check_examples, clip_values
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.fedavg import spec

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FedAvgServer:
    name = spec.NAME

    MEMORY_FACTOR = 6.0
    """An agent holds its copy, the base, gradients and the encoded update: like Ferret's."""

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        self.params: spec.Params = parsed
        context = context or MethodContext()
        if context.model_dir is None:
            raise ConfigError(
                "fedavg needs the base model's weights on the aggregator: set run.model_dir"
            )
        self.model_dir = Path(context.model_dir)
        self._regions = context.regions
        self.dtype = _DTYPES[parsed.fedavg.dtype]
        self.global_state = load_base_weights(self.model_dir, self.dtype)
        self.payload_bytes = sum(t.numel() * t.element_size() for t in self.global_state.values())
        limit = context.max_message_bytes
        if limit is not None and self.payload_bytes + spec.PAYLOAD_SLACK > limit:
            raise ConfigError(
                f"fedavg sends the whole model, {self.payload_bytes / 1e6:.0f} MB per update; "
                f"server.max_message_bytes is {limit} (set it to at least "
                f"{self.payload_bytes + spec.PAYLOAD_SLACK})"
            )
        self._params_json = parsed.model_dump(mode="json")
        self._specs = {
            n: payloads.TensorSpec(tuple(t.shape), t.dtype) for n, t in self.global_state.items()
        }
        self.round = 0
        self._payload: tuple[int, bytes] | None = None
        self._acc = Aggregator(parsed.aggregation)
        log.info(
            "fedavg: %d parameters in %d tensors, %s, %.0f MB each way per agent",
            sum(t.numel() for t in self.global_state.values()),
            len(self.global_state),
            parsed.fedavg.dtype,
            self.payload_bytes / 1e6,
        )

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None if the agent can hold full-parameter training, else why not."""
        need = self.MEMORY_FACTOR * self.payload_bytes
        have = max([g.memory_free for g in profile.gpus], default=profile.ram_available)
        if have >= need:
            return None
        where = "GPU" if profile.gpus else "RAM"
        return (
            f"full-parameter training needs about {need / 2**30:.1f} GiB ({self.MEMORY_FACTOR:g}x "
            f"the {self.payload_bytes / 2**30:.2f} GiB of weights); it has "
            f"{have / 2**30:.1f} GiB free {where}"
        )

    # --- what agents are sent ---------------------------------------------------------------

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        target = round if kind == "eval" else round - 1
        if target == 0:
            return Assignment(params=self._params_json)  # everyone starts from the base
        if self._payload is None or self._payload[0] != target:
            data = payloads.encode_dense(self.global_state, method=self.name, round=target)
            self._payload = (target, data)
        return Assignment(params=self._params_json, blobs={spec.GLOBAL_BLOB: self._payload[1]})

    # --- what comes back --------------------------------------------------------------------

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        expect = payloads.Expect(
            kind=payloads.PayloadKind.DENSE, method=self.name, round=round, tensors=self._specs
        )
        payload = decode_update(blobs, spec.UPDATE_BLOB, expect)
        if set(payload.tensors) != set(self._specs):
            missing = sorted(set(self._specs) - set(payload.tensors))[:3]
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"the update lacks parameters, e.g. {missing}"
            )
        check_examples(result.num_examples, self.params.aggregation.max_examples)
        tensors = payload.tensors
        metrics = dict(result.metrics)
        clip = self.params.aggregation.clip_norm
        if clip is not None:
            tensors, scale = clip_values(tensors, self.global_state, clip)
            metrics["clip_scale"] = scale
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=tensors,
            metrics=metrics,
        )

    # --- aggregation ------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._acc = Aggregator(self.params.aggregation)

    def add(self, update: Update) -> None:
        region = update.agent_id in self._regions  # a regional tier's count is not capped
        weight = self.params.aggregation.weight(update.num_examples, region=region)
        self._acc.add(update.tensors, weight)

    def finish_round(self, round: int) -> dict[str, float]:
        mean = self._acc.result()
        moved = 0.0
        if mean:
            with torch.no_grad():
                for name, value in mean.items():
                    new = value.to(self.dtype)
                    moved += float((new.float() - self.global_state[name].float()).square().sum())
                    self.global_state[name] = new
            self._payload = None
        self.round = round
        return {"examples": float(self._acc.weight), "step_norm": moved**0.5}

    # --- state ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {"params": json.dumps(self._params_json, sort_keys=True), "round": str(self.round)}
        return dict(self.global_state), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        if set(tensors) != set(self._specs):
            raise StateError("the checkpoint holds another model's parameters (fedavg)")
        self.global_state = {k: v.to(self.dtype).clone() for k, v in tensors.items()}
        self.round = int(meta.get("round", "0"))
        self._payload = None

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """The full fine-tuned model as an HF directory (FedAvg trains every weight)."""
        info = {"method": self.name, "base_model": base_model_name, "round": self.round}
        return write_full_model(self.model_dir, self.global_state, out_dir, info)


Server = FedAvgServer
