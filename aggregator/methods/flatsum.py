"""A flat float64 accumulator: a running weighted sum of named tensors in one numpy buffer.

The first update fixes the layout (names, shapes, offsets); the sum lives in one contiguous
float64 array, and each update is added in place, tensor by tensor, in cache-sized chunks:
``w·x`` is formed in float64 in a small scratch buffer (exact: a float32 times an integer
weight below 2²⁹ is exact in float64) and added into the sum, so no float64 temporary of a
tensor's size is ever made (torch's mixed-dtype in-place add is slow on CPU, and a per-tensor
``x.to(float64) * w`` allocates twice the update). The mean is one division at the end.

The layout follows the first update's memory order when its tensors are views of one buffer (a
decoded payload's: its data area). An update whose float32 tensors lie back to back in that
order (every payload of the same encoder) is added as one span, in a handful of numpy calls,
instead of two per tensor (a LoRA update of SmolLM2 has 240): the helper thread then hardly
needs the GIL, and the loop thread that queues the update hardly either.

An update of :data:`PARALLEL_MIN` elements or more is added on a helper thread without waiting
(numpy's ufuncs release the GIL): the intake goes on taking the next group while it is summed.
With :data:`HELPERS` > 1 (for a machine with cores to spare) the buffer is cut into that many
parts, fixed by the first update, and each part has a helper thread of its own that adds every
update's share of that part: the parts are summed at once (each numpy call releases the GIL,
and between two calls a helper needs it back only briefly). Each helper adds the updates in the
order they were added, and an element is only ever added to by its part's helper, so the
arithmetic per element, and the sum, are the same either way; :meth:`FlatSum.settle` (and
:meth:`FlatSum.result`, and :attr:`FlatSum.data`) waits for them. At most :data:`QUEUED_MAX`
wait their turn: an update held for its sum keeps its tensors (for fedit, the received
message) alive until then.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["FlatSum"]

CHUNK = 1 << 18
"""Elements per step of an add: the scratch buffer is 2 MiB (measured on the 2-core VM, 4M
float32 elements: 1 << 15 4.95 ms, 1 << 18 4.27 ms). Fewer steps matter as much: between two
steps the helper thread needs the GIL back, and while the loop thread runs Python it waits for
it (up to the switch interval, 5 ms): with 1 << 15, a 16 MB update's sum took up to 160 ms
beside the intake instead of ~5."""
PARALLEL_MIN = 1 << 20
"""An update of this many elements or more is added on the helper thread (4 MiB of float32)."""
QUEUED_MAX = 8
"""Updates queued for the helper at most; one more waits for the oldest (the caller, the
intake's loop, then stops taking messages: 8 is a burst of 8 agents' updates)."""
HELPERS = 1
"""Helper threads a large accumulator is summed on, one per part of it. One until more is
measured better: on the 16 cores of a device machine (docs/benchmarks.md, issue 25) summing a
16 MB update on one helper took 16.7 ms against 4.3-5 ms alone on a 2-core VM, the intake's
longest chain beside the log's writes; whether parts on several helpers shorten it there is
what ``benchmarks/aggregator_throughput.py --sum-helpers N`` measures (not yet run on many
cores; on 2 cores the cores are the limit)."""

_NUMPY = (torch.float32, torch.float64, torch.float16)


@functools.cache
def _helper(part: int) -> ThreadPoolExecutor:
    """The helper thread of part ``part``, shared by every accumulator (created on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flatsum-{part}")


def _flat(t: torch.Tensor) -> np.ndarray:
    """``t`` as a flat numpy array, without a copy when it is already a contiguous CPU one."""
    t = t.detach()
    if t.dtype not in _NUMPY:
        t = t.to(torch.float32)  # bfloat16 has no numpy dtype; float32 holds it exactly
    return t.cpu().contiguous().reshape(-1).numpy()


def _span(tensors: Mapping[str, torch.Tensor], order: list[str]) -> torch.Tensor | None:
    """The tensors as one flat float32 tensor, when they are contiguous float32 CPU views of one
    storage lying back to back in ``order`` (a decoded payload's); else None."""
    first = tensors[order[0]]
    if first.dtype is not torch.float32 or first.device.type != "cpu":
        return None
    storage = first.untyped_storage()
    at = first.data_ptr()
    for name in order:
        t = tensors[name]
        if (
            t.dtype is not torch.float32
            or t.data_ptr() != at
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        at += 4 * t.numel()
    n = (at - first.data_ptr()) // 4
    return first.new_empty(0).set_(storage, first.storage_offset(), (n,), (1,)).detach()


def _memory_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names in the order their tensors lie in memory, when they are all CPU views of one
    storage; else in the mapping's order."""
    names = list(tensors)
    ts = list(tensors.values())
    if not ts or any(t.device.type != "cpu" for t in ts):
        return names
    base = ts[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != base for t in ts):
        return names
    return sorted(names, key=lambda n: tensors[n].data_ptr())


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
    """Add large updates on the helper threads (False: on the caller's; the benchmark
    compares)."""
    helpers = HELPERS
    """Parts (and helper threads) of a large accumulator, fixed by its first update."""

    def __init__(self) -> None:
        self.layout: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        """name -> (offset, size, shape) in :attr:`data`."""
        self._data = np.zeros(0, np.float64)
        self._scratch = np.zeros(0, np.float64)
        self._bounds: list[tuple[int, int]] = []
        """The parts' [start, end) in :attr:`data`, one per helper."""
        self._scratches: list[np.ndarray] = []
        """Each part's helper's scratch buffer."""
        self._queued: list[list[Future[None]]] = []
        """Adds handed to the helpers (per update, one per part), oldest first."""
        self._order: list[str] = []
        """The layout's names in order (its offsets increasing)."""

    def __bool__(self) -> bool:
        return bool(self.layout)

    @property
    def data(self) -> np.ndarray:
        """The running sum, every update added so far in it (waits for the helper)."""
        self.settle()
        return self._data

    def names(self) -> set[str]:
        return set(self.layout)

    def _start(self, tensors: Mapping[str, torch.Tensor]) -> None:
        offset = 0
        for name in _memory_order(tensors):
            t = tensors[name]
            self.layout[name] = (offset, t.numel(), tuple(t.shape))
            offset += t.numel()
        self._order = list(self.layout)
        self._data = np.zeros(offset, np.float64)
        self._scratch = np.empty(min(CHUNK, max(offset, 1)), np.float64)
        parts = max(1, self.helpers) if offset >= PARALLEL_MIN else 1
        step = -(-offset // parts // CHUNK) * CHUNK or CHUNK  # whole chunks per part
        self._bounds = [(lo, min(lo + step, offset)) for lo in range(0, offset, step)]
        self._scratches = [np.empty_like(self._scratch) for _ in self._bounds]

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add ``weight`` times ``tensors``; they must have the first update's names and shapes
        (``ValueError`` otherwise, before anything is added). A large update is added on the
        helper thread, after those before it; this returns once it is queued."""
        if not self.layout:
            self._start(tensors)
        elif tensors.keys() != self.layout.keys():
            raise ValueError("tensor names differ from the first update's")
        for name, t in tensors.items():
            if tuple(t.shape) != self.layout[name][2]:
                raise ValueError(f"{name!r}: shape {tuple(t.shape)} != {self.layout[name][2]}")
        w = float(weight)
        span = _span(tensors, self._order) if self._order else None
        pieces: list[tuple[int, np.ndarray]]  # (offset in the buffer, values)
        if span is not None:  # one span in the layout's order: one pair
            pieces = [(0, span.numpy())]
        else:
            pieces = [(self.layout[name][0], _flat(t)) for name, t in tensors.items()]
        if self._data.size < PARALLEL_MIN or not self.parallel:
            self.settle()  # after the queued ones: the same order of additions
            _add([(self._data[o : o + x.size], x) for o, x in pieces], w, self._scratch)
            return
        while len(self._queued) >= QUEUED_MAX:
            for add in self._queued.pop(0):
                add.result()
        adds = []
        for part, ((lo, hi), scratch) in enumerate(zip(self._bounds, self._scratches, strict=True)):
            pairs = []
            for o, x in pieces:  # each piece's share of [lo, hi)
                a, b = max(o, lo), min(o + x.size, hi)
                if a < b:
                    pairs.append((self._data[a:b], x[a - o : b - o]))
            adds.append(_helper(part).submit(_add, pairs, w, scratch))
        self._queued.append(adds)

    def settle(self) -> None:
        """Wait until every update added so far is in the sum."""
        queued, self._queued = self._queued, []
        for adds in queued:
            for add in adds:
                add.result()

    def result(self, divisor: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The sum divided by ``divisor``, per name, as ``dtype`` tensors."""
        out: dict[str, torch.Tensor] = {}
        data = self.data
        for name, (offset, size, shape) in self.layout.items():
            part = data[offset : offset + size] / divisor
            out[name] = torch.from_numpy(part).to(dtype).reshape(shape)
        return out
