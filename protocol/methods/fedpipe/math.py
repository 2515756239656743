"""FedPipe's shared names and ΔW math: adapters of different ranks in ``ΔW = c(r)·B·A``.

Names: a module ``model.layers.3.mlp.up_proj`` has the peft keys
``base_model.model.model.layers.3.mlp.up_proj.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``; peft scales its output by ``c(r)``, the module's scaling at
its rank ``r``: ``alpha / r``, or with ``lora.rslora`` ``alpha / √(r·r0)`` (peft's
``use_rslora`` at ``lora_alpha = alpha/√r0``, ``r0 = lora.r``)
(:meth:`~protocol.methods.fedpipe.spec.FedpipeLora.module_scaling`; every function here takes
that ``scaling``).

Aggregation (server): the example-weighted mean of the agents' ``ΔW_a`` is kept as a low-rank
sum, exactly: with ``w_a = n_a / Σn`` and ``s_a = c(r_a)``,

    ΔW = Σ_a w_a·s_a·B_a·A_a = [w_1 s_1 B_1 | … | w_k s_k B_k] · [A_1; …; A_k] = P·Q

(float64). Its SVD comes from two thin QRs, ``P = Q_P R_P``, ``Qᵀ = Q_Q R_Q``, and the SVD of
the small ``R_P·R_Qᵀ = U' S V'ᵀ``: ``U = Q_P U'``, ``V = Q_Q V'``. Never a dense ``out × in``
product: the server's memory and the checkpoint grow with the ranks, not with the model.
The global is kept as peft factors at its own rank ``R`` (singular values above
``RANK_RTOL · s_max``): ``B_R = U_R·√S_R/√c(R)``, ``A_R = √S_R·V_Rᵀ/√c(R)``, float32,
components in decreasing singular value.

Truncation for an agent of rank ``r``: ``B = B_R[:, :r]·√(c(R)/c(r))``,
``A = A_R[:r]·√(c(R)/c(r))``, so ``c(r)·B·A = U_r S_r V_rᵀ``, the best rank-r approximation
(Eckart–Young). When ``r > R`` the missing components get ``B`` columns of zero and the seeded
``A`` rows of ``edge_agent.training.lora`` (rows ``R..r-1`` of the seeded ``[r, in]`` matrix of
that key), so they can train while ``c(r)·B·A`` is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from protocol.lora_init import initial_a

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
Scaling = Callable[[int], float]
"""A module's LoRA scaling ``c(r)`` at rank ``r``."""
RANK_RTOL = 1e-6
"""Singular values below this share of the largest are dropped from the global (float32
cannot hold them next to the largest anyway)."""


def keys(module: str) -> tuple[str, str]:
    """The peft state-dict keys ``(lora_A, lora_B)`` of ``module``."""
    return f"{PEFT_PREFIX}{module}{A_SUFFIX}", f"{PEFT_PREFIX}{module}{B_SUFFIX}"


def module_of(key: str) -> str | None:
    """The module of a peft ``lora_A``/``lora_B`` key, else None."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
            return key[len(PEFT_PREFIX) : -len(suffix)]
    return None


def ranks_of(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Rank per module of a peft adapter state (its ``lora_A`` rows)."""
    out: dict[str, int] = {}
    for key, t in state.items():
        module = module_of(key)
        if module is not None and key.endswith(A_SUFFIX):
            out[module] = int(t.shape[0])
    return out


def delta(a: torch.Tensor, b: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """Dense ``ΔW = c(r)·B·A`` in float64 (for tests and checks)."""
    return scaling(a.shape[0]) * (b.double() @ a.double())


class LowRankSum:
    """The running ``Σ w·c(r)·B·A`` of one module, kept as stacked factors (float64)."""

    def __init__(self) -> None:
        self.left: list[torch.Tensor] = []
        self.right: list[torch.Tensor] = []

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float, scaling: Scaling) -> None:
        self.left.append(b.double() * (weight * scaling(a.shape[0])))
        self.right.append(a.double())

    def svd(self, total_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vᵀ)`` of the weighted mean ``ΔW`` (thin, float64, S descending)."""
        p = torch.cat(self.left, dim=1) / total_weight
        q = torch.cat(self.right, dim=0)
        q_p, r_p = torch.linalg.qr(p, mode="reduced")
        q_q, r_q = torch.linalg.qr(q.T, mode="reduced")
        u_small, s, vh_small = torch.linalg.svd(r_p @ r_q.T, full_matrices=False)
        return q_p @ u_small, s, (q_q @ vh_small.T).T


def global_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: Scaling
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft factors ``(A_R, B_R)`` (float32) at the global's own rank ``R``:
    ``c(R)·B_R·A_R = U_R S_R V_Rᵀ``."""
    keep = int((s > RANK_RTOL * float(s[0])).sum()) if s.numel() and float(s[0]) > 0 else 0
    r = max(keep, 1)  # an all-zero ΔW keeps one zero component: peft needs rank >= 1
    root = torch.sqrt(s[:r].clamp(min=0) / scaling(r))
    if keep == 0:
        root = torch.zeros(r, dtype=s.dtype)
    a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
    b = (u[:, :r] * root[None, :]).to(torch.float32).contiguous()
    return a, b


def truncate(
    a_glob: torch.Tensor,
    b_glob: torch.Tensor,
    r: int,
    scaling: Scaling,
    *,
    a_key: str,
    init_seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` peft factors whose ``c(r)·B·A`` is the best rank-r approximation of the
    global ``c(R)·B_R·A_R`` (components in decreasing singular value)."""
    big_r, in_f = a_glob.shape
    keep = min(r, big_r)
    factor = math.sqrt(scaling(big_r) / scaling(r))
    a = torch.empty(r, in_f, dtype=torch.float32)
    b = torch.zeros(b_glob.shape[0], r, dtype=torch.float32)
    a[:keep] = a_glob[:keep] * factor
    b[:, :keep] = b_glob[:, :keep] * factor
    if keep < r:
        a[keep:] = initial_a(a_key, r, in_f, init_seed)[keep:]
    return a, b
