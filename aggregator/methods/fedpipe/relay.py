"""FedPipe in a regional tier: the region plans its own agents and answers with its mean ΔW.

The upstream treats a region (``Hello.role = "region"``) as one participant that trains no ranks
of its own (``aggregator.methods.fedpipe.server``): its score task is an agent's, its train and eval
tasks carry the selection (``params.selected``) and the global ``ΔW`` as exact factors.

The region is a :class:`~aggregator.methods.fedpipe.server.FedpipeServer` that takes the upstream's
parameters, selection and global instead of making its own:

- **score**: its agents score as they would for the upstream; the region answers with their
  example-weighted mean per matrix and their total, which the upstream weighs by that total —
  the flat weighted mean of every agent's scores.
- **train**: the region solves the plan (ranks, batch, precision) for its own agents — the
  upstream knows none of them — and sends each the global truncated at its ranks. Their updates
  fold into a low-rank running sum as on the upstream; the region answers with the mean ``ΔW_R``
  as exact factors (``c(R)·B·A``, ``R`` its rank per module, ``c`` the scaling of the upstream's
  ``lora``) and ``num_examples = W_R``. The upstream adds ``W_R·ΔW_R = Σ_{a∈R} n_a·ΔW_a``: the flat sum, in ΔW space (singular values
  below ``RANK_RTOL`` of the largest are dropped at each tier, as on the upstream).
- **eval**: its agents evaluate the upstream's global.

What tiering changes: the plan is solved per region, not over all agents at once. The objective
(the slowest agent's round time) is a maximum over agents, so each region minimising its own
slowest agent gives the same bottleneck, but the capacity floor (a total rank) is met per
region, and each region learns its own agents' speeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import StateError
from aggregator.methods import Assignment, MethodContext
from aggregator.methods.fedpipe.server import FedpipeServer
from aggregator.tier.relay import Answers, NoGlobalState
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.methods import parse_params
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec


class FedpipeRelay(FedpipeServer):
    per_agent = False  # its agents train the upstream's selection, planned in tiers

    def __init__(self, params: Mapping[str, Any], context: MethodContext) -> None:
        self.answers = Answers()
        super().__init__(params, context)  # selects nothing: only ever the upstream's

    def _load_selection(self) -> None:
        """A region never selects: the upstream's task names the selection."""

    def set_task(self, kind: str, round: int, assignment: Assignment) -> None:
        parsed = parse_params(spec.NAME, assignment.params)
        assert isinstance(parsed, spec.Params)
        if parsed.lora.target_modules != self.params.lora.target_modules:
            self._set_candidates(parsed.lora.target_modules)
        self.params = parsed.model_copy(update={"selected": (), "ranks": {}})
        if kind == "score":
            return
        unknown = [m for m in parsed.selected if m not in self.candidates]
        if unknown or (kind == "train" and not parsed.selected):
            raise StateError(
                f"fedpipe: the upstream's {kind} task names no usable selection "
                f"(unknown: {unknown[:3]}); is the upstream older than this region?"
            )
        # an evaluation before any selection (round 0) evaluates the base model
        self.selection.selected = list(parsed.selected)
        raw = assignment.blobs.get(spec.GLOBAL_BLOB)
        if raw is None:
            self.global_ab = {}
            self._payloads.clear()
            return
        expect = payloads.Expect(kind=payloads.PayloadKind.LORA, method=self.name, round=round)
        try:
            tensors = payloads.decode(raw, expect).tensors
        except ProtocolError as exc:
            raise StateError(f"fedpipe: the upstream's global is not valid: {exc}") from None
        self._set_global(tensors, "the upstream's global")

    # --- what the region answers --------------------------------------------------------------

    def wants_score(self, round: int) -> bool:
        return False  # only when the upstream asks

    def finish_score(self, round: int) -> dict[str, float]:
        weight, sums, scored = self.selection.take(self.params, self.candidates)
        if weight == 0:
            self.answers.drop("score", round)
            return {"scored_agents": 0.0}
        means = {m: torch.tensor([sums[m] / weight], dtype=torch.float32) for m in sums}
        data = payloads.encode_dense(means, method=self.name, round=round)
        self.answers.put("score", round, {spec.SCORE_BLOB: data}, weight)
        return {"scored_agents": float(scored)}

    def begin_round(self, round: int) -> None:
        super().begin_round(round)
        self.answers.drop("train", round)

    def finish_round(self, round: int) -> dict[str, float]:
        metrics = super().finish_round(round)  # global_ab[m] = the region's mean ΔW, m trained
        if self._combined.weight:
            state: dict[str, torch.Tensor] = {}
            for module in self._combined.modules():
                a_key, b_key = fm.keys(module)
                state[a_key], state[b_key] = self.global_ab[module]
            data = payloads.encode_lora(state, method=self.name, round=round)
            self.answers.put("train", round, {spec.UPDATE_BLOB: data}, self._combined.weight)
        return metrics

    # --- state: the last answer and the agents' learnt speeds --------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta = self.answers.state()
        _, own = super().state()
        return tensors, {"relay": self.name, "speed": own["speed"], **meta}

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.answers.restore(tensors, meta)
        super().restore({}, {"speed": meta.get("speed", "{}")})

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        raise NoGlobalState()
