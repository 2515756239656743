"""FedBiOT's client proximal term, on the merged adapter weights as the reference computes it.

The reference (``HarliWu/FedBiOT``, ``bilevel_OT_trainer.py``) adds λ·‖W − W₀‖² over the adapter
layers' weights, W the weight in use now and W₀ the one at round start, with λ = 1.0. With LoRA
the weight in use is ``W_base + s·B·A`` (s = alpha / r of the module), so per adapted linear

    ‖W − W₀‖²_F = s²·‖B·A − B₀·A₀‖²_F
                = s²·(Σ (BᵀB)∘(AAᵀ) − 2·Σ (BᵀB₀)∘(AA₀ᵀ) + Σ (B₀ᵀB₀)∘(A₀A₀ᵀ))

(⟨BA, B₀A₀⟩ = tr(AᵀBᵀB₀A₀) = tr((BᵀB₀)(A₀Aᵀ)) = Σ (BᵀB₀)∘(AA₀ᵀ), ∘ elementwise),

computed from r×r products (never the out×in matrix: a 7B model's adapter layers would need
hundreds of MB per module for it). The term is λ·Σ over the adapted linears of that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Factors:
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scaling: float
    a0: torch.Tensor
    b0: torch.Tensor
    start_sq: torch.Tensor
    """‖B₀A₀‖²_F, a constant of the round."""


def _factors(model: Any) -> list[_Factors]:
    """Every adapted linear of ``model`` with its factors now (the round start)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a: Any = module.lora_A["default"].weight
        b: Any = module.lora_B["default"].weight
        a0, b0 = a.detach().clone(), b.detach().clone()
        start_sq = ((b0.T @ b0) * (a0 @ a0.T)).sum()
        out.append(_Factors(a, b, float(module.scaling["default"]), a0, b0, start_sq))
    return out


def merged_distance(model: Any, factors: list[_Factors]) -> torch.Tensor:
    """Σ over the adapted linears of ‖(W_base + s·B·A) − (W_base + s·B₀·A₀)‖²_F."""
    terms = []
    for f in factors:
        now_sq = ((f.b.T @ f.b) * (f.a @ f.a.T)).sum()
        cross = ((f.b.T @ f.b0) * (f.a @ f.a0.T)).sum()  # ⟨BA, B₀A₀⟩
        terms.append(f.scaling**2 * (now_sq - 2 * cross + f.start_sq))
    return torch.stack(terms).sum()


def merged_proximal(model: Any, weight: float) -> Callable[[torch.nn.Module], torch.Tensor] | None:
    """``weight``·‖merged adapter − merged adapter now‖², summed over the adapted linears; None
    when ``weight`` is 0 (no term). Call at round start, after the global adapter is loaded."""
    if weight <= 0:
        return None
    factors = _factors(model)
    if not factors:
        raise ValueError("the model carries no LoRA adapter to hold near its start")

    def term(_model: torch.nn.Module) -> torch.Tensor:
        return weight * merged_distance(model, factors)

    return term
