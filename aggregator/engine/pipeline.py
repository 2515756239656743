"""Decoding ahead: a burst's messages are decoded (their blobs' sha256 checked) on worker
threads while the loop thread handles the ones before them.

``frames.decode`` is pure (bytes in, a :class:`~protocol.frames.Decoded` or a
:class:`~protocol.errors.FrameError` out), and its cost for a large update is the sha256 of
the blob, which releases the GIL; the engine's part (validate, store, sum) stays on the loop
thread, in arrival order. Up to :data:`WORKERS` messages are hashed at once (one per core, at
most four): the messages of agents that send together arrive together, and one worker hashing
them one after another was the intake's longest chain (measured on the 2-core VM, 16 MB LoRA
updates: the loop waited 10.8 ms per update for it). A burst of one is decoded inline (there is nothing to overlap), and so
is a burst of small messages (see :data:`AHEAD_MIN_BYTES`). The service also takes messages
ahead while it handles a group (:meth:`DecodeAhead.start`): their decoding starts then, and
they open the next group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protocol.frames import Decoded, FrameLike, decode

__all__ = ["DecodeAhead"]

Decoder = Callable[[], Decoded]
"""Returns the message decoded (or raises what ``frames.decode`` raised)."""


AHEAD_MIN_BYTES = 1 << 20
"""A burst whose messages are all smaller is decoded inline: handing a small message to a thread
costs more than its sha256 (measured: Ferret's 13 KB updates were 0.6-1.04x as fast ahead)."""


WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Decoding threads: hashing releases the GIL, so each can have a core."""


def _nbytes(frames: Sequence[FrameLike]) -> int:
    total = 0
    for f in frames:
        buffer: Any = getattr(f, "buffer", f)  # a zmq.Frame's bytes, or the bytes themselves
        total += memoryview(buffer).nbytes
    return total


class DecodeAhead:
    """Worker threads (:data:`WORKERS`) that decode a burst's messages ahead of the loop."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def burst(self, messages: Sequence[Sequence[FrameLike]]) -> list[Decoder | None]:
        """Per message (its frames after the routing id), what decodes it: started now on the
        worker, or None (decode it inline) for a burst of one or of small messages."""
        if len(messages) < 2 or max(map(_nbytes, messages)) < AHEAD_MIN_BYTES:
            return [None] * len(messages)
        pool = self._workers()
        return [pool.submit(decode, frames).result for frames in messages]

    def start(self, frames: Sequence[FrameLike]) -> Decoder | None:
        """One message's decoding started now on the worker, when it is large (a message taken
        ahead, while the loop still handles the group before it); None: decode it inline."""
        if _nbytes(frames) < AHEAD_MIN_BYTES:
            return None
        return self._workers().submit(decode, frames).result

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="decode-ahead")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
