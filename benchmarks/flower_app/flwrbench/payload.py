"""The fixed LoRA-shaped arrays both apps send: names and shapes from a JSON file.

Every tensor is distinct (random, seeded by who sends it and in which round), because Flower
stores and ships each object once by content hash: equal tensors would travel once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord


def read_shapes(path: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) pairs from ``{"tensors": [[name, [dims...]], ...]}``."""
    data = json.loads(Path(path).read_text())
    return [(str(name), tuple(int(d) for d in dims)) for name, dims in data["tensors"]]


def make_record(shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> ArrayRecord:
    """An ArrayRecord of float32 arrays with the given names and shapes, values from ``seed``."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: Array(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
        for name, shape in shapes
    }
    return ArrayRecord(arrays)
