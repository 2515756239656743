"""A flat float64 accumulator: a running weighted sum of named tensors in one numpy buffer.

The first update fixes the layout (names, shapes, offsets); the sum lives in one contiguous
float64 array, and each update is added in place, tensor by tensor, in cache-sized chunks:
``w·x`` is formed in float64 in a small scratch buffer (exact: a float32 times an integer
weight below 2²⁹ is exact in float64) and added into the sum, so no float64 temporary of a
tensor's size is ever made (torch's mixed-dtype in-place add is slow on CPU, and a per-tensor
``x.to(float64) * w`` allocates twice the update). The mean is one division at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["FlatSum"]

CHUNK = 1 << 15
"""Elements per step of an add: the scratch buffer (256 KiB) stays in cache."""

_NUMPY = (torch.float32, torch.float64, torch.float16)


def _flat(t: torch.Tensor) -> np.ndarray:
    """``t`` as a flat numpy array, without a copy when it is already a contiguous CPU one."""
    t = t.detach()
    if t.dtype not in _NUMPY:
        t = t.to(torch.float32)  # bfloat16 has no numpy dtype; float32 holds it exactly
    return t.cpu().contiguous().reshape(-1).numpy()


class FlatSum:
    """``Σ wᵢ·xᵢ`` over updates of one layout; see the module docstring."""

    def __init__(self) -> None:
        self.layout: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        """name -> (offset, size, shape) in :attr:`data`."""
        self.data = np.zeros(0, np.float64)
        self._scratch = np.zeros(0, np.float64)

    def __bool__(self) -> bool:
        return bool(self.layout)

    def names(self) -> set[str]:
        return set(self.layout)

    def _start(self, tensors: Mapping[str, torch.Tensor]) -> None:
        offset = 0
        for name, t in tensors.items():
            self.layout[name] = (offset, t.numel(), tuple(t.shape))
            offset += t.numel()
        self.data = np.zeros(offset, np.float64)
        self._scratch = np.empty(min(CHUNK, max(offset, 1)), np.float64)

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add ``weight`` times ``tensors``; they must have the first update's names and shapes
        (``ValueError`` otherwise, before anything is added)."""
        if not self.layout:
            self._start(tensors)
        elif tensors.keys() != self.layout.keys():
            raise ValueError("tensor names differ from the first update's")
        for name, t in tensors.items():
            if tuple(t.shape) != self.layout[name][2]:
                raise ValueError(f"{name!r}: shape {tuple(t.shape)} != {self.layout[name][2]}")
        w = float(weight)
        for name, t in tensors.items():
            offset, size, _ = self.layout[name]
            src, dst = _flat(t), self.data[offset : offset + size]
            if w == 1.0:
                np.add(dst, src, out=dst)  # numpy casts in its own small buffers
                continue
            for lo in range(0, size, CHUNK):
                hi = min(lo + CHUNK, size)
                part = self._scratch[: hi - lo]
                np.multiply(src[lo:hi], w, out=part, dtype=np.float64)
                np.add(dst[lo:hi], part, out=dst[lo:hi])

    def result(self, divisor: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The sum divided by ``divisor``, per name, as ``dtype`` tensors."""
        out: dict[str, torch.Tensor] = {}
        for name, (offset, size, shape) in self.layout.items():
            part = self.data[offset : offset + size] / divisor
            out[name] = torch.from_numpy(part).to(dtype).reshape(shape)
        return out
