"""A flat float64 accumulator: a running weighted sum of named tensors in one numpy buffer.

The first update fixes the layout (names, shapes, offsets); the sum lives in one contiguous
float64 array, and each update is added in place, tensor by tensor, in cache-sized chunks:
``w·x`` is formed in float64 in a small scratch buffer (exact: a float32 times an integer
weight below 2²⁹ is exact in float64) and added into the sum, so no float64 temporary of a
tensor's size is ever made (torch's mixed-dtype in-place add is slow on CPU, and a per-tensor
``x.to(float64) * w`` allocates twice the update). The mean is one division at the end.

An update of :data:`PARALLEL_MIN` elements or more is added by two threads, each over half of
its elements (numpy's ufuncs release the GIL): the intake adds a group's updates after
its sync, when the other core has nothing else to do. The arithmetic per element is the same
either way, so the sum is too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["FlatSum"]

CHUNK = 1 << 15
"""Elements per step of an add: the scratch buffer (256 KiB) stays in cache."""
PARALLEL_MIN = 1 << 20
"""An update of this many elements or more is added by two threads (4 MiB of float32)."""

_NUMPY = (torch.float32, torch.float64, torch.float16)


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The one helper thread every accumulator shares (created on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="flatsum")


def _flat(t: torch.Tensor) -> np.ndarray:
    """``t`` as a flat numpy array, without a copy when it is already a contiguous CPU one."""
    t = t.detach()
    if t.dtype not in _NUMPY:
        t = t.to(torch.float32)  # bfloat16 has no numpy dtype; float32 holds it exactly
    return t.cpu().contiguous().reshape(-1).numpy()


def _add(pairs: list[tuple[np.ndarray, np.ndarray]], w: float, scratch: np.ndarray) -> None:
    """``dst += w·src`` for each (dst, src), in float64 through ``scratch``."""
    for dst, src in pairs:
        if w == 1.0:
            np.add(dst, src, out=dst)  # numpy casts in its own small buffers
            continue
        for lo in range(0, dst.size, CHUNK):
            hi = min(lo + CHUNK, dst.size)
            part = scratch[: hi - lo]
            np.multiply(src[lo:hi], w, out=part, dtype=np.float64)
            np.add(dst[lo:hi], part, out=dst[lo:hi])


class FlatSum:
    """``Σ wᵢ·xᵢ`` over updates of one layout; see the module docstring."""

    parallel = True
    """Add large updates on two threads (False: on the caller's; the benchmark compares)."""

    def __init__(self) -> None:
        self.layout: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        """name -> (offset, size, shape) in :attr:`data`."""
        self.data = np.zeros(0, np.float64)
        self._scratch = np.zeros(0, np.float64)
        self._scratch2 = np.zeros(0, np.float64)
        """The helper thread's scratch buffer."""

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
        pairs = []
        for name, t in tensors.items():
            offset, size, _ = self.layout[name]
            pairs.append((self.data[offset : offset + size], _flat(t)))
        total = self.data.size
        if total < PARALLEL_MIN or not self.parallel:
            _add(pairs, w, self._scratch)
            return
        mine: list[tuple[np.ndarray, np.ndarray]] = []  # the first half of the elements
        left = total // 2
        while left > 0:
            dst, src = pairs.pop(0)
            if dst.size > left:  # this tensor is cut in two
                pairs.insert(0, (dst[left:], src[left:]))
                dst, src = dst[:left], src[:left]
            mine.append((dst, src))
            left -= dst.size
        if self._scratch2.size < self._scratch.size:
            self._scratch2 = np.empty_like(self._scratch)
        other = _helper().submit(_add, pairs, w, self._scratch2)
        try:
            _add(mine, w, self._scratch)
        finally:
            other.result()

    def result(self, divisor: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The sum divided by ``divisor``, per name, as ``dtype`` tensors."""
        out: dict[str, torch.Tensor] = {}
        for name, (offset, size, shape) in self.layout.items():
            part = self.data[offset : offset + size] / divisor
            out[name] = torch.from_numpy(part).to(dtype).reshape(shape)
        return out
