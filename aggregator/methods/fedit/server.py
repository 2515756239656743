"""FedIT server half: FedAvg of LoRA factors, weighted by each agent's example count."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import UpdateRejected
from aggregator.methods import Assignment, MethodContext, Update, decode_update
from aggregator.methods.robust import Aggregator, check_examples, clip_lora
from aggregator.store.export import write_peft_adapter
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import TaskResult
from protocol.methods import parse_params
from protocol.methods._common import AggregationParams
from protocol.methods.fedit import spec


class FedAvg(Aggregator):
    """A streaming, example-weighted running sum of named tensors (float64 accumulators)."""

    def __init__(self) -> None:
        super().__init__(AggregationParams())

    def add(self, tensors: Mapping[str, torch.Tensor], weight: int) -> None:
        if self.sums and set(tensors) != set(self.sums):
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "tensor names differ from the round's")
        super().add(tensors, weight)

    def mean(self) -> dict[str, torch.Tensor]:
        return self.result()


class FeditServer:
    name = spec.NAME

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        self.params: spec.Params = parsed
        self.global_state: dict[str, torch.Tensor] = {}
        self._payload: tuple[int, bytes] | None = None
        self._acc = Aggregator(self.params.aggregation)
        self._round_shapes: dict[str, tuple[int, ...]] | None = None

    # --- what agents are sent ---------------------------------------------------------------

    def _global_payload(self, round: int) -> bytes:
        if self._payload is None or self._payload[0] != round:
            data = payloads.encode_lora(self.global_state, method=self.name, round=round)
            self._payload = (round, data)
        return self._payload[1]

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        blobs = {spec.GLOBAL_BLOB: self._global_payload(round)} if self.global_state else {}
        return Assignment(params=self.params.model_dump(mode="json"), blobs=blobs)

    # --- what comes back --------------------------------------------------------------------

    def _expect(self, round: int) -> payloads.Expect:
        tensors = None
        if self.global_state:
            tensors = {
                k: payloads.TensorSpec(shape=tuple(v.shape), dtype=v.dtype)
                for k, v in self.global_state.items()
            }
        return payloads.Expect(
            kind=payloads.PayloadKind.LORA,
            method=self.name,
            round=round,
            tensors=tensors,
            max_rank=self.params.lora.r,
        )

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        payload = decode_update(blobs, spec.UPDATE_BLOB, self._expect(round))
        if not payload.tensors:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "the update holds no tensors")
        check_examples(result.num_examples, self.params.aggregation.max_examples)
        shapes = {k: tuple(v.shape) for k, v in payload.tensors.items()}
        if self._round_shapes is None:
            self._round_shapes = shapes  # round 1: the first valid update fixes the layout
        elif shapes != self._round_shapes:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, "tensor names or shapes differ from the round's"
            )
        tensors = payload.tensors
        clip = self.params.aggregation.clip_norm
        metrics = dict(result.metrics)
        if clip is not None:
            tensors, scale = clip_lora(tensors, self.global_state or None, clip)
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
        self._round_shapes = (
            {k: tuple(v.shape) for k, v in self.global_state.items()} if self.global_state else None
        )

    def add(self, update: Update) -> None:
        self._acc.add(update.tensors, update.num_examples)

    def finish_round(self, round: int) -> dict[str, float]:
        combined = self._acc.result()
        if combined:
            self.global_state = combined
            self._payload = None
        return {"examples": float(self._acc.weight)}

    # --- state ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {"params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True)}
        return dict(self.global_state), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.global_state = {k: v.clone() for k, v in tensors.items()}
        self._payload = None

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        return write_peft_adapter(
            out_dir, self.global_state, self.params.lora, base_model_name=base_model_name
        )


Server = FeditServer
