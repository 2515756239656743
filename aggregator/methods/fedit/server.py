"""FedIT server half: FedAvg of LoRA factors, weighted by each agent's example count.

The layout an update must have follows from the task (``aggregator.methods.lora_layout``): exact from
the base model's headers when the run names ``model_dir``; otherwise checked against the
targets and ranks, with round 1's layout the one most agents sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import UpdateRejected
from aggregator.methods import Assignment, MethodContext, Update, decode_update
from aggregator.methods.lora_layout import (
    LayoutVote,
    Signature,
    check_task_layout,
    expected_layout,
    last_layers,
    layer_index,
    signature,
)
from aggregator.methods.robust import Aggregator, check_examples, clip_lora
from aggregator.store.export import write_peft_adapter
from protocol import payloads
from protocol._payload_checks import square_sums
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
        if self.sums and set(tensors) != self.sums.names():
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
        self._base_square_sums: tuple[dict[str, torch.Tensor], dict[str, float]] | None = None
        """A global state and its sums of squares; see :meth:`_base_sums`."""
        self._payload: tuple[int, bytes] | None = None
        self._acc = Aggregator(self.params.aggregation)
        context = context or MethodContext()
        self._regions = context.regions
        n = self.params.last_layers
        self._layers = (
            last_layers(context.model_dir, n)
            if n is not None and context.model_dir is not None
            else None
        )
        self._layout = (
            expected_layout(context.model_dir, self.params.lora, self._layers)
            if context.model_dir is not None
            else None
        )
        self._vote: LayoutVote | None = None
        self._layouts_ok: set[Signature] = set()
        """Layouts (names and shapes) that passed :func:`check_task_layout` (a few at most)."""

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
        if self._layout is not None:
            tensors = {k: payloads.TensorSpec(s, torch.float32) for k, s in self._layout.items()}
        elif self.global_state:
            tensors = {
                k: payloads.TensorSpec(shape=tuple(v.shape), dtype=v.dtype)
                for k, v in self.global_state.items()
            }
        lora = self.params.lora
        return payloads.Expect(
            kind=payloads.PayloadKind.LORA,
            method=self.name,
            round=round,
            tensors=tensors,
            max_rank=max([lora.r, *lora.rank_pattern.values()]),
        )

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        # no copy of the update (16 MB at r=35 on SmolLM2): its tensors are views of the
        # received blob; fedit only reads them (a clipped update is a new tensor)
        payload = decode_update(blobs, spec.UPDATE_BLOB, self._expect(round), copy=False)
        if not payload.tensors:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "the update holds no tensors")
        check_examples(result.num_examples, self.params.aggregation.max_examples)
        sig = signature(payload.tensors)
        if sig not in self._layouts_ok:  # the same names and shapes pass the same way
            check_task_layout(payload.tensors, self.params.lora)
            if len(self._layouts_ok) >= 8:
                self._layouts_ok.clear()
            self._layouts_ok.add(sig)
        if self._vote is not None and not self._vote.admits(sig):
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "too many distinct layouts sent")
        tensors = payload.tensors
        clip = self.params.aggregation.clip
        metrics = dict(result.metrics)
        if clip is not None:
            base = self.global_state or None
            tensors, scale = clip_lora(tensors, base, clip, payload.square_sums, self._base_sums())
            metrics["clip_scale"] = scale
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=tensors,
            metrics=metrics,
        )

    def _base_sums(self) -> dict[str, float] | None:
        """The global adapter's float32 sums of squares (for the clip's cheapest bound), found
        once per global state."""
        if not self.global_state:
            return None
        if self._base_square_sums is None or self._base_square_sums[0] is not self.global_state:
            self._base_square_sums = (self.global_state, square_sums(self.global_state))
        return self._base_square_sums[1]

    # --- aggregation ------------------------------------------------------------------------

    @property
    def known_layout(self) -> dict[str, tuple[int, ...]] | None:
        """The adapter's names and shapes when the model fixes them (``run.model_dir``)."""
        return dict(self._layout) if self._layout is not None else None

    def begin_round(self, round: int) -> None:
        self._acc = Aggregator(self.params.aggregation)
        # no model and no global yet: the layout most agents send wins (never the first's)
        unknown = self._layout is None and not self.global_state
        self._vote = LayoutVote(lambda: Aggregator(self.params.aggregation)) if unknown else None

    def add(self, update: Update) -> None:
        region = update.agent_id in self._regions
        weight = self.params.aggregation.weight(update.num_examples, region=region)
        if self._vote is not None:
            self._vote.add(signature(update.tensors), update.tensors, weight)
        else:
            self._acc.add(update.tensors, weight)

    def settle(self) -> None:
        """Wait until every update added is in the running sum (large ones are summed on a
        helper thread while the intake goes on; :meth:`finish_round` waits too)."""
        self._acc.settle()
        if self._vote is not None:
            for acc in self._vote.by_layout.values():
                acc.settle()

    def finish_round(self, round: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self._vote is not None:
            won = self._vote.winner()
            if won is not None:
                _, self._acc, left_out = won
                metrics["layout_left_out"] = float(left_out)
            elif self._vote.count:  # a tie: nothing applied
                metrics["layout_left_out"] = float(self._vote.count)
        combined = self._acc.result()
        if combined:
            self.global_state = combined
            self._payload = None
        return {"examples": float(self._acc.weight), **metrics}

    # --- state ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {"params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True)}
        return dict(self.global_state), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.global_state = {k: v.clone() for k, v in tensors.items()}
        self._payload = None

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        layers: tuple[int, ...] = ()
        if self.params.last_layers is not None:  # the layers the adapter covers
            found = {layer_index(k) for k in self.global_state}
            layers = tuple(sorted(i for i in found if i is not None))
        return write_peft_adapter(
            out_dir,
            self.global_state,
            self.params.lora,
            base_model_name=base_model_name,
            layers=layers,
        )


Server = FeditServer
