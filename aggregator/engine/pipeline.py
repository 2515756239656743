"""Decoding ahead: a burst's messages are decoded (their blobs' sha256 checked) on a worker
thread while the loop thread handles the ones before them.

``frames.decode`` is pure (bytes in, a :class:`~protocol.frames.Decoded` or a
:class:`~protocol.errors.FrameError` out), and its cost for a large update is the sha256 of
the blob, which releases the GIL; the engine's part (validate, store, sum) stays on the loop
thread, in arrival order. A burst of one is decoded inline: there is nothing to overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from protocol.frames import Decoded, FrameLike, decode

__all__ = ["DecodeAhead"]

Decoder = Callable[[], Decoded]
"""Returns the message decoded (or raises what ``frames.decode`` raised)."""


class DecodeAhead:
    """One worker thread that decodes a burst's messages ahead of the loop."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def burst(self, messages: Sequence[Sequence[FrameLike]]) -> list[Decoder | None]:
        """Per message (its frames after the routing id), what decodes it: started now on the
        worker, or None (decode it inline) for a burst of one."""
        if len(messages) < 2:
            return [None] * len(messages)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead")
        return [self._pool.submit(decode, frames).result for frames in messages]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
