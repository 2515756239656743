"""FedPipe's combination of one round's updates in ΔW space, under ``[method.aggregation]``.

Agents train at different ranks, so updates are combined as ``ΔW_i = c(r_i)·B_i·A_i`` per
module (``c`` the module scaling, :data:`~protocol.methods.fedpipe.math.Scaling`), never factor
by factor. Each update is first clipped: its change of the model,
``‖ΔW_i − ΔW_global‖`` over all modules, is bounded by ``clip_norm`` by pulling it toward the
global along the straight line (``ΔW_global + s·(ΔW_i − ΔW_global)``, s exact since the change is
linear in s). Then:

- ``fedavg``: the example-weighted mean, kept as stacked low-rank factors
  (:class:`~protocol.methods.fedpipe.math.LowRankSum`, the pull adds the global's factors with
  weight ``w·(1 − s)``); no dense ``ΔW`` is ever formed.
- ``median`` / ``trimmed_mean``: coordinate-wise over the dense ``ΔW_i`` of the updates that
  carry the module (out × in float64 each, held until the round closes: memory grows with the
  agents and the modules' size; meant for a robust run, not the default).

Either way the result is a ``(U, S, Vᵀ)`` per module, which FedPipe truncates to the global rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aggregator.methods.robust import Aggregator
from protocol.methods._common import AggregationParams
from protocol.methods.fedpipe import math as fm

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B)


def _scaled(
    a: torch.Tensor, b: torch.Tensor, scaling: fm.Scaling
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c(r)·B, A)`` in float64."""
    return b.double() * scaling(a.shape[0]), a.double()


def change_norm(
    update: Mapping[str, Factors], base: Mapping[str, Factors], scaling: fm.Scaling
) -> float:
    """``‖ΔW_update − ΔW_base‖`` over all modules, with rank-sized products only."""
    total = 0.0
    for module, (a, b) in update.items():
        left, right = _scaled(a, b, scaling)
        if module in base:
            left_g, right_g = _scaled(*base[module], scaling)
            left, right = torch.cat([left, -left_g], dim=1), torch.cat([right, right_g], dim=0)
        total += float(torch.trace((left.T @ left) @ (right @ right.T)).clamp(min=0.0))
    return total**0.5


class DeltaCombiner:
    """One round's updates, clipped and combined in ΔW space."""

    def __init__(
        self, params: AggregationParams, scaling: fm.Scaling, global_ab: Mapping[str, Factors]
    ) -> None:
        self.params = params
        self.scaling = scaling
        self.global_ab = dict(global_ab)
        self.sums: dict[str, fm.LowRankSum] = {}
        self.dense: dict[str, Aggregator] = {}
        self.weight = 0
        self.module_weight: dict[str, float] = {}
        """Per module, the weight of the updates that carried it (an agent adapts its own
        matrices: a module's mean is over the agents that trained it)."""

    def add(self, tensors: Mapping[str, torch.Tensor], weight: int) -> float:
        """Fold one update in with ``weight``; return its clip scale (1.0: not clipped)."""
        update: dict[str, Factors] = {}
        for key, a in tensors.items():
            module = fm.module_of(key)
            if module is not None and key.endswith(fm.A_SUFFIX):
                update[module] = (a, tensors[fm.keys(module)[1]])
        scale = 1.0
        clip = self.params.clip
        if clip is not None:
            norm = change_norm(update, self.global_ab, self.scaling)
            scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for module, (a, b) in update.items():
            self.module_weight[module] = self.module_weight.get(module, 0) + weight
            base = self.global_ab.get(module)
            if self.params.rule == "fedavg":
                acc = self.sums.setdefault(module, fm.LowRankSum())
                acc.add(a, b, weight * scale, self.scaling)
                if scale < 1.0 and base is not None:
                    acc.add(base[0], base[1], weight * (1.0 - scale), self.scaling)
            else:
                left, right = _scaled(a, b, self.scaling)
                delta = scale * (left @ right)
                if scale < 1.0 and base is not None:
                    left_g, right_g = _scaled(*base, self.scaling)
                    delta += (1.0 - scale) * (left_g @ right_g)
                self.dense.setdefault(module, Aggregator(self.params)).add({"d": delta}, weight)
        self.weight += weight
        return scale

    def modules(self) -> list[str]:
        """The modules some update of the round carried."""
        return list(self.sums if self.params.rule == "fedavg" else self.dense)

    def svds(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(U, S, Vᵀ)`` of each module's combined ΔW (thin, float64, S descending)."""
        if self.weight == 0:
            return {}
        if self.params.rule == "fedavg":
            return {m: acc.svd(float(self.module_weight[m])) for m, acc in self.sums.items()}
        out = {}
        for module, acc in self.dense.items():
            combined = acc.result()["d"].to(torch.float64)
            u, s, vh = torch.linalg.svd(combined, full_matrices=False)
            out[module] = (u, s, vh)
        return out
