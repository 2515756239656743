"""Aggregation rules: streaming FedAvg, coordinate-wise trimmed mean and median, LoRA clipping.

FedAvg keeps a float64 running sum (one flat buffer, :mod:`aggregator.methods.flatsum`), so the aggregator never holds a round's updates. The robust
rules need every update of the round at once (a median is not a running sum); they hold them.

Clipping a LoRA update is done on what it does to the model, ΔW = B·A − B₀·A₀ summed over all
adapted modules, not on the factors. An update whose ΔW norm exceeds the bound is pulled toward
the global adapter along the straight line between the two (factors f₀ + s·(f − f₀)), with s
found by bisection so that the new ΔW norm equals the bound. Norms use the trace identity
‖U·V‖² = tr((UᵀU)(VVᵀ)), which costs rank-sized matrices, never the out×in ΔW.

Most honest updates are well inside the bound, so :func:`clip_lora` first tries an upper bound
from the factors' sums of squares alone (no pass over the data at all when the payload's finite
check computed them, see :func:`lora_square_bound`), then a tighter one from the factors' own
norms (one pass over each factor, see :func:`lora_delta_bound`), and computes the exact norm
only when both exceed the clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from aggregator.errors import UpdateRejected
from aggregator.methods.flatsum import FlatSum
from protocol._payload_checks import square_sums
from protocol.errors import ErrorCode
from protocol.methods._common import AggregationParams

Tensors = Mapping[str, torch.Tensor]
_A, _B = ".lora_A.weight", ".lora_B.weight"


def _modules(state: Tensors) -> list[str]:
    return sorted(k[: -len(_A)] for k in state if k.endswith(_A))


def _product_sq_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """‖U·V‖_F² for U (out×k), V (k×in), via tr((UᵀU)(VVᵀ))."""
    u64, v64 = u.to(torch.float64), v.to(torch.float64)
    return float(torch.trace((u64.T @ u64) @ (v64 @ v64.T)).clamp(min=0.0))


def lora_delta_norm(update: Tensors, base: Tensors | None, s: float = 1.0) -> float:
    """Norm of Σ ΔW for the update moved a fraction ``s`` of the way from ``base``.

    Without a base (round 1, B₀ = 0 and A₀ = the shared seeded init) ΔW(s) = s·B·A.
    """
    total = 0.0
    for m in _modules(update):
        a, b = update[m + _A], update[m + _B]
        if base is None or m + _A not in base:
            total += s * s * _product_sq_norm(b, a)
            continue
        a0, b0 = base[m + _A], base[m + _B]
        a1 = a0 + s * (a - a0)
        b1 = b0 + s * (b - b0)
        # B₁A₁ − B₀A₀ = [B₁, −B₀] · [A₁; A₀]
        total += _product_sq_norm(torch.cat([b1, -b0], dim=1), torch.cat([a1, a0], dim=0))
    return total**0.5


_SLACK = 1e-4
"""Relative margin on the cheap bound, for the rounding of its float32 arithmetic (a float32
norm's relative error is ~log2(n)·2⁻²⁴, far below this)."""


_TINY = 1e-12
"""Below this bound the float32 squares in the cheap bound could underflow: exact norm only."""


def _fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def lora_delta_bound(update: Tensors, base: Tensors | None) -> float:
    """An upper bound on :func:`lora_delta_norm` (``s = 1``) from Frobenius norms of factors.

    ``B·A − B₀·A₀ = (B − B₀)·A + B₀·(A − A₀)`` and ``‖X·Y‖ ≤ ‖X‖·‖Y‖``, so per module
    ``‖ΔW‖ ≤ ‖B − B₀‖·‖A‖ + ‖B₀‖·‖A − A₀‖`` (``‖B‖·‖A‖`` without a base): one pass over each
    factor instead of rank-sized matrix products in float64.
    """
    total = 0.0
    for m in _modules(update):
        a, b = update[m + _A], update[m + _B]
        if base is None or m + _A not in base:
            bound = _fro(b) * _fro(a)
        else:
            a0, b0 = base[m + _A], base[m + _B]
            bound = _fro(b - b0) * _fro(a) + _fro(b0) * _fro(a - a0)
        total += bound * bound
    return total**0.5 * (1.0 + _SLACK)


_U32 = 2.0**-24
"""float32's unit roundoff."""
_TINY32 = 2.0**-126
"""float32's smallest normal number."""


def _norm_from_sum(sq: float | None, n: int) -> float:
    """An upper bound on ‖x‖ from ``sq``, x's sum of squares as float32 computed it (in any
    order): ``sq ≥ (1 − γ)·‖x‖² − n·2⁻¹²⁶`` with ``γ = n·u/(1 − n·u)`` for n non-negative terms
    and u float32's unit roundoff (Higham, *Accuracy and Stability of Numerical Algorithms*,
    §4.2, one more rounding for the squares; the second term covers squares and sums that fell
    below float32's normal range). ``inf`` when unknown, overflowed, or n too large for the
    margin to mean anything."""
    nu = n * _U32
    if sq is None or not math.isfinite(sq) or nu >= 0.25:
        return math.inf
    gamma = nu / (1.0 - nu)
    return math.sqrt((max(sq, 0.0) + n * _TINY32) / (1.0 - gamma))


def lora_square_bound(
    update: Tensors,
    base: Tensors | None,
    sums: Mapping[str, float] | None = None,
    base_sums: Mapping[str, float] | None = None,
) -> float:
    """An upper bound on :func:`lora_delta_norm` (``s = 1``) from sums of squares alone.

    Per module ``‖ΔW‖ ≤ ‖B − B₀‖·‖A‖ + ‖B₀‖·‖A − A₀‖ ≤ (‖B‖ + ‖B₀‖)·‖A‖ + ‖B₀‖·(‖A‖ + ‖A₀‖)``
    (``‖B‖·‖A‖`` without a base): looser than :func:`lora_delta_bound`, but it needs no pass
    over the factors when ``sums`` (the update's float32 sums of squares, ``Payload.
    square_sums``) and ``base_sums`` are given, each widened by its rounding margin
    (:func:`_norm_from_sum`). Missing sums are computed (:func:`square_sums`); a factor that
    is not float32 or whose squares overflowed makes the bound ``inf``.
    """
    if sums is None:
        sums = square_sums(update)
    if base is not None and base_sums is None:
        base_sums = square_sums(base)
    total = 0.0
    for m in _modules(update):
        a, b = update[m + _A], update[m + _B]
        na, nb = (
            _norm_from_sum(sums.get(m + _A), a.numel()),
            _norm_from_sum(sums.get(m + _B), b.numel()),
        )
        if base is None or base_sums is None or m + _A not in base:
            bound = nb * na
        else:
            a0, b0 = base[m + _A], base[m + _B]
            na0 = _norm_from_sum(base_sums.get(m + _A), a0.numel())
            nb0 = _norm_from_sum(base_sums.get(m + _B), b0.numel())
            bound = (nb + nb0) * na + nb0 * (na + na0)
        total += bound * bound
    return math.sqrt(total) * (1.0 + _SLACK)


def clip_lora(
    update: Tensors,
    base: Tensors | None,
    max_norm: float,
    sums: Mapping[str, float] | None = None,
    base_sums: Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The update pulled toward ``base`` until its ΔW norm is at most ``max_norm``; and s.

    ``sums`` / ``base_sums``: the factors' float32 sums of squares where already known (see
    :func:`lora_square_bound`; without ``sums`` that bound is not tried, as it would cost a pass
    over the factors like the next one); they only decide how cheaply an update well inside
    the bound is let through, never the result."""
    cheap = max_norm >= _TINY and (
        (sums is not None and lora_square_bound(update, base, sums, base_sums) <= max_norm)
        or lora_delta_bound(update, base) <= max_norm
    )
    if cheap or lora_delta_norm(update, base) <= max_norm:
        return dict(update), 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if lora_delta_norm(update, base, mid) > max_norm:
            hi = mid
        else:
            lo = mid
    s = lo
    out: dict[str, torch.Tensor] = {}
    for name, value in update.items():
        if base is not None and name in base:
            out[name] = base[name] + s * (value - base[name])
        elif base is None and name.endswith(_B):
            out[name] = s * value  # A stays the shared initial A; ΔW = s·B·A
        else:
            out[name] = value.clone()
    return out, s


def clip_values(
    update: Tensors, base: Tensors | None, max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Dense (or masked-value) tensors pulled toward ``base`` (zero when None) until
    ``‖update − base‖₂`` over all of them is at most ``max_norm``; and the scale s (exact: the
    change is linear in s, so s = max_norm / norm)."""
    diffs = {
        k: v.to(torch.float64) - (base[k].to(torch.float64) if base and k in base else 0.0)
        for k, v in update.items()
    }
    norm = sum(float(d.square().sum()) for d in diffs.values()) ** 0.5
    if norm <= max_norm:
        return dict(update), 1.0
    s = max_norm / norm
    out = {
        k: ((base[k].to(torch.float64) if base and k in base else 0.0) + s * d).to(update[k].dtype)
        for k, d in diffs.items()
    }
    return out, s


class Aggregator:
    """One round's combination of updates under ``params``'s rule."""

    def __init__(self, params: AggregationParams) -> None:
        self.params = params
        self.sums = FlatSum()
        self.held: list[dict[str, torch.Tensor]] = []
        self.weight = 0
        self.count = 0

    def add(self, tensors: Tensors, weight: int) -> None:
        if weight <= 0:
            return
        if self.params.rule != "fedavg":
            self.held.append(dict(tensors))
        else:
            try:
                self.sums.add(tensors, weight)
            except ValueError as exc:
                raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, str(exc)) from None
        self.weight += weight
        self.count += 1

    def settle(self) -> None:
        """Wait until every update added is in the running sum (see :class:`FlatSum`)."""
        self.sums.settle()

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            return {}
        if self.params.rule == "fedavg":
            return self.sums.result(self.weight)
        out: dict[str, torch.Tensor] = {}
        for name in self.held[0]:
            stack = torch.stack([u[name].to(torch.float64) for u in self.held])
            if self.params.rule == "median":
                value = (
                    stack.quantile(0.5, dim=0) if stack.numel() < 2**24 else stack.median(0).values
                )
            else:
                n = stack.shape[0]
                k = int(self.params.trim * n)
                ordered = stack.sort(dim=0).values
                value = ordered[k : n - k].mean(dim=0)
            out[name] = value.to(torch.float32)
        return out


def check_examples(num_examples: int, limit: int) -> None:
    """Raises :class:`UpdateRejected` unless an update's example count is in ``[1, limit]``."""
    if num_examples < 1 or num_examples > limit:
        raise UpdateRejected(
            ErrorCode.REJECTED_UPDATE, f"example count {num_examples} outside [1, {limit}]"
        )
