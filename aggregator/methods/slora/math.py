"""SLoRA's server-side math: the target weights, their seeded masks, and the SVD switch.

:func:`svd_init` turns a target's dense stage-1 update ``ΔW`` into LoRA factors whose
``scaling·B·A`` is its best rank-r approximation (see ``protocol/methods/slora/spec.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from protocol import randomness
from protocol.lora_init import initial_a

# --- targets and masks --------------------------------------------------------------------------


def mask_of(seed: int, name: str, numel: int, density: float) -> torch.Tensor:
    """The flat indices of ``name``'s mask (the spec's ``mask_indices``), int64."""
    key = randomness.stream_key(seed, name)
    return torch.from_numpy(randomness.mask_indices(key, numel, density))


# --- the switch ---------------------------------------------------------------------------------


DENSE_SVD_MAX_DIM = 2048
"""Targets up to this size in their smaller dimension get a full LAPACK SVD; larger ones
the top ``r`` triplets only, by ARPACK on the sparse ``ΔW`` (``scipy.sparse.linalg.svds``)."""


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Intra-op threads off for small SVDs: on the 2-core dev box, with two agents training
    beside the aggregator, OpenMP oversubscription made the 120 SVDs of SmolLM2-135M's
    attention weights take 167 s with 2 threads and 9 s with 1 (float32, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k, S_k, V_kᵀ)`` of ``delta`` (float32), singular values descending."""
    if min(delta.shape) <= DENSE_SVD_MAX_DIM or k >= min(delta.shape):
        with _one_thread():
            u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import svds

    matrix = csr_matrix(delta.to(torch.float64).numpy())
    start = np.ones(min(matrix.shape))  # fixed start vector: the same factors on every run
    u_np, s_np, vh_np = svds(matrix, k=k, tol=0, v0=start, solver="arpack")
    order = np.argsort(s_np)[::-1].copy()
    return (
        torch.from_numpy(u_np[:, order]).to(torch.float32),
        torch.from_numpy(s_np[order]).to(torch.float32),
        torch.from_numpy(vh_np[order]).to(torch.float32),
    )


def svd_init(
    delta: torch.Tensor, r: int, scaling: float, *, a_name: str, init_seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``(A [r, in], B [out, r])`` with ``scaling·B·A`` = the rank-r SVD of ``delta``.

    ``B = U_r·sqrt(S_r)/sqrt(scaling)``, ``A = sqrt(S_r)·V_rᵀ/sqrt(scaling)``, float32 (the SVD
    too: half the time of float64; the switch is still seconds on a real model).
    Components with a zero singular value (or beyond ``min(out, in)``) would never train (both
    factors zero), so their ``A`` rows get the seeded LoRA init of ``edge_agent.training.lora`` and their
    ``B`` columns stay zero, which leaves ``scaling·B·A`` as it is. Also returns the share of
    ``‖delta‖²`` that the rank-r approximation keeps (1.0 for a zero ``delta``).
    """
    out_f, in_f = delta.shape
    u, s, vh = top_svd(delta, min(r, out_f, in_f))
    k = s.numel()
    root = torch.sqrt(s / scaling)
    b = torch.zeros(out_f, r)
    a = torch.zeros(r, in_f)
    b[:, :k] = u * root
    a[:k] = root[:, None] * vh
    tol = (float(s[0]) if k else 0.0) * max(out_f, in_f) * torch.finfo(torch.float32).eps
    dead = [i for i in range(r) if i >= k or float(s[i]) <= tol]
    if dead:
        seeded = initial_a(a_name, r, in_f, init_seed)
        for i in dead:
            a[i] = seeded[i]
            b[:, i] = 0.0
    total = float(delta.to(torch.float64).square().sum())
    kept = float(s.to(torch.float64).square().sum())
    return a, b, min(kept / total, 1.0) if total > 0 else 1.0


def scatter(values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``ΔW`` (float64) with ``values`` at the flat positions ``mask``."""
    dense = torch.zeros(math.prod(shape), dtype=torch.float64)
    dense[mask] = values.to(torch.float64)
    return dense.reshape(shape)
