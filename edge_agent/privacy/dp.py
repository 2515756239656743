"""The agent's half of client-level DP-FedAvg: clip the update, add Gaussian noise.

The update is the change of the whole adapter, Δ = θ − θ_ref over every tensor taken as one
vector, where θ_ref is the global adapter the task carried (round 1: the seeded initial one).
It is scaled to ‖Δ‖₂ ≤ C, then noise N(0, s²) is added to every value (``s`` from the task:
σ·C in local mode, σ·C/√m as this agent's share of the central noise under secure
aggregation, 0 when the aggregator adds the noise). The noise comes from a generator seeded
from the operating system's entropy (:func:`secrets.randbits`), fresh per task.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import torch


def clip_and_noise(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    clip: float,
    noise_std: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """``reference + clip(state − reference) + noise``; also the clip scale (1.0: not clipped)."""
    if set(state) != set(reference):
        raise ValueError("the update and its reference name different tensors")
    names = sorted(state)
    delta = {n: state[n].detach().to(torch.float64) - reference[n].to(torch.float64) for n in names}
    norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))  # type: ignore[arg-type]
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    out = {}
    for n in names:
        noisy = delta[n] * scale
        if noise_std > 0:
            noisy = (
                noisy
                + torch.randn(noisy.shape, generator=generator, dtype=torch.float64) * noise_std
            )
        out[n] = (reference[n].to(torch.float64) + noisy).to(torch.float32)
    return out, scale
