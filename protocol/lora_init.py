"""The seeded initial LoRA adapter every agent builds alike (and the aggregator can rebuild
from names and shapes alone): ``A`` uniform in ±1/√in_features from the shared-randomness
stream of ``(init_seed, name)``, ``B`` zero. The agent's :func:`edge_agent.training.lora.
init_lora_state` uses it; the aggregator uses it as round 1's reference where it needs one
(central DP's clip of each update's change)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from protocol import randomness


def initial_a(name: str, r: int, in_features: int, init_seed: int) -> torch.Tensor:
    """Module ``name``'s initial ``lora_A`` (``r`` × ``in_features``, float32)."""
    u = randomness.uniform(randomness.stream_key(init_seed, name), r * in_features)
    bound = 1.0 / math.sqrt(in_features)
    values = ((2.0 * u - 1.0) * bound).astype(np.float32)
    return torch.from_numpy(values.reshape(r, in_features))


def initial_adapter(
    shapes: Mapping[str, tuple[int, ...]], init_seed: int
) -> dict[str, torch.Tensor] | None:
    """The initial adapter with these tensor names and shapes; None unless every name is a
    ``lora_A`` / ``lora_B`` weight of rank-2 shape."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            return None
        if name.endswith(".lora_A.weight"):
            out[name] = initial_a(name, int(shape[0]), int(shape[1]), init_seed)
        elif name.endswith(".lora_B.weight"):
            out[name] = torch.zeros(int(shape[0]), int(shape[1]))
        else:
            return None
    return out
