"""Ferret under secure aggregation: coefficients as a dense G × K grid that masks can sum.

A plain Ferret agent sends triples for its own draw of ``n_g`` seeds per group, so two agents'
payloads do not line up element by element. Every agent of a round draws from the *same* pool
of K seed indices (base seed ``B_r``, which does not depend on the agent), so the server's
aggregate is a sum over one shared ``(group, seed)`` grid. Under secure aggregation each agent
therefore sends that whole grid, ``n_groups × K`` float values in row-major order (group, then
seed), zero where it drew nothing, and the masked sum is the plain path's sum.

This is *not* the dense K × L projection DESIGN keeps off the wire: the grid holds one
coefficient per (group, seed), K numbers per group, never a basis or a parameter-sized
vector. It costs ``8 × n_groups × K`` bytes per agent per round (ring elements are 64-bit),
against 12 bytes per triple for plain Ferret (``benchmarks/ferret_secagg_bytes.py``).

Clipping. The plain server clamps every received coefficient to ``±ferret.clip_norm``
(``FerretServer.validate``). Under secure aggregation it never sees one, so each agent clamps
its own coefficients the same way before masking (:func:`dense_grid`); the unmasked mean then
equals the plain path's mean of clamped coefficients up to the fixed-point error, and the
server rebuilds the step from it with the same bit-exact :func:`~protocol.methods.ferret.math.apply_step`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from protocol import payloads
from protocol.secagg import wire

GRID_NAME = "coef"
"""The one tensor of a Ferret masked layout: shape ``(n_groups, k)``."""


def grid_layout(base_seed: int, k: int, n_groups: int) -> wire.Layout:
    """The masked layout of a Ferret round: the grid, kind ``seedcoef`` and the pool's identity
    (base seed, K, group count), which both sides derive from the task, so they must agree."""
    meta = {
        payloads.BASE_SEED_KEY: str(int(base_seed)),
        payloads.K_KEY: str(int(k)),
        payloads.N_GROUPS_KEY: str(int(n_groups)),
    }
    return wire.Layout(
        [(GRID_NAME, (int(n_groups), int(k)))], payloads.PayloadKind.SEEDCOEF.value, meta
    )


def dense_grid(
    group: torch.Tensor,
    seed: torch.Tensor,
    value: torch.Tensor,
    *,
    n_groups: int,
    k: int,
    clip_norm: float,
) -> tuple[npt.NDArray[np.float64], int]:
    """The flat ``n_groups × k`` grid of an agent's triples, each coefficient clamped to
    ``±clip_norm`` in float32 as the plain server clamps it; and how many were clamped.

    Indices must be in range and each (group, seed) pair at most once (a decoded ``seedcoef``
    payload is checked for both)."""
    g = group.to(torch.int64)
    s = seed.to(torch.int64)
    if g.numel() and (
        int(g.min()) < 0 or int(g.max()) >= n_groups or int(s.min()) < 0 or int(s.max()) >= k
    ):
        raise ValueError(f"triples outside the {n_groups} x {k} grid")
    values = value.to(torch.float32)
    clipped = int((values.abs() > clip_norm).sum())
    values = values.clamp(-clip_norm, clip_norm)
    flat = g * k + s
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("a (group, seed) pair occurs more than once")
    grid = np.zeros(n_groups * k, dtype=np.float64)
    grid[flat.numpy()] = values.to(torch.float64).numpy()
    return grid, clipped


def triples_from_grid(
    mean: npt.NDArray[np.floating] | torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (group, seed, value) triples of a flat mean grid, rounded to float32 first and
    then its non-zero entries in ascending (group, seed) order, as ``FerretServer.finish_round``
    turns its own mean into a step."""
    values = torch.as_tensor(np.asarray(mean)).reshape(-1).to(torch.float32)
    flat = torch.nonzero(values).squeeze(1)
    return (
        (flat // k).to(torch.int32),
        (flat % k).to(torch.int32),
        values[flat].clone(),
    )
