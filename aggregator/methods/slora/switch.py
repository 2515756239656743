"""SLoRA's switch from the sparse stage to LoRA, and what it is measured by.

:func:`lora_from_sparse` turns the committed stage-1 state (one float32 vector of masked values
per sparse target) into the stage-2 adapter over the LoRA targets (a subset of the sparse
targets, checked by the spec): with ``init = "svd"`` (the paper) each LoRA target's
``scaling·B·A`` is the rank-r SVD of its ``ΔW``; with ``init = "random"`` (the ablation) it is
FedIT's initialisation (seeded ``A``, ``B = 0``), so stage 2 starts from the base model as if
stage 1 had not run. The stage-1 update of a sparse target that is no LoRA target is dropped.
The energy it reports is the share of ``Σ‖ΔW‖²_F`` over every sparse target that the adapter
keeps (0 for the ablation).

:class:`SwitchEvals` collects the agents' ``switch_eval_*`` metrics of the first stage-2 round
(each agent evaluated the switch's adapter before training, and reports its own evaluations of
the base, round 0, and of the last stage-1 global when it made them) into the round's metrics:
example-weighted means, and ``switch_gain_kept`` = ``(base − switch) / (base − sparse)`` of the
eval loss: the share of stage 1's eval-loss gain that the adapter keeps (1: nothing lost at the
switch; 0: back to the base; computed over the agents that sent all three).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from aggregator.methods.slora.math import mask_of, scatter, svd_init
from protocol.lora_init import initial_a
from protocol.methods.slora import spec

PEFT_PREFIX = "base_model.model."
STAGES = ("", "base_", "sparse_")
EVAL_KEYS = ("loss", "em", "rouge_l")


def delta_w(
    name: str, shape: tuple[int, int], values: torch.Tensor | None, seed: int, density: float
) -> torch.Tensor:
    """The dense stage-1 update ``ΔW`` (float64) of one target; zero without values."""
    if values is None:
        return torch.zeros(shape, dtype=torch.float64)
    return scatter(values, mask_of(seed, name, math.prod(shape), density), shape)


def lora_from_sparse(
    shapes: Mapping[str, tuple[int, int]],
    values: Mapping[str, torch.Tensor],
    *,
    seed: int,
    density: float,
    params: spec.Params,
) -> tuple[dict[str, torch.Tensor], float]:
    """The stage-2 adapter (peft names) from the stage-1 state, and the energy it keeps."""
    lora = params.lora
    state: dict[str, torch.Tensor] = {}
    kept = total = 0.0
    targets = tuple(lora.target_modules)
    for name, shape in shapes.items():
        delta = delta_w(name, shape, values.get(name), seed, density)
        energy = float(delta.square().sum())
        total += energy
        module = name.removesuffix(".weight")
        if not any(module == t or module.endswith("." + t) for t in targets):
            continue  # trained in stage 1, no LoRA target: its update ends here
        prefix = PEFT_PREFIX + module
        a_name = f"{prefix}.lora_A.weight"
        if params.sparse.init == "random":
            a = initial_a(a_name, lora.r, shape[1], lora.init_seed)
            b = torch.zeros(shape[0], lora.r)
        else:
            a, b, share = svd_init(
                delta, lora.r, lora.scaling, a_name=a_name, init_seed=lora.init_seed
            )
            kept += share * energy
        state[a_name] = a
        state[f"{prefix}.lora_B.weight"] = b
    return state, kept / total if total > 0 else (0.0 if params.sparse.init == "random" else 1.0)


class SwitchEvals:
    """The first stage-2 round's ``switch_eval_*`` metrics, example-weighted over agents."""

    def __init__(self, max_examples: int = 1_000_000) -> None:
        self.max_examples = max_examples
        """The most examples one agent's switch evaluation counts for (its task's
        ``eval.max_examples``: an agent claiming 1e14 once made the report say anything)."""
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._gain = [0.0, 0.0]  # Σ w·(base − switch), Σ w·(base − sparse)

    def add(self, metrics: Mapping[str, float]) -> None:
        w = min(float(metrics.get("switch_eval_examples", 0.0)), float(self.max_examples))
        if not w > 0:
            return
        for stage in STAGES:
            for k in EVAL_KEYS:
                key = f"switch_eval_{stage}{k}"
                if key in metrics and math.isfinite(metrics[key]):
                    self._sums[key] = self._sums.get(key, 0.0) + w * metrics[key]
                    self._weights[key] = self._weights.get(key, 0.0) + w
        losses = [metrics.get(f"switch_eval_{s}loss") for s in STAGES]
        if all(v is not None and math.isfinite(v) for v in losses):
            after, base, sparse = (float(v) for v in losses if v is not None)
            self._gain[0] += w * (base - after)
            self._gain[1] += w * (base - sparse)

    def result(self) -> dict[str, float]:
        out = {k: s / self._weights[k] for k, s in self._sums.items()}
        if self._gain[1] > 0:
            out["switch_gain_kept"] = self._gain[0] / self._gain[1]
        return out
