"""Multipart framing of edgefed messages.

Frame layout of one message (what a DEALER sends; a ROUTER sees one identity frame before it)::

    frame 0      b"EFED/1"                signature: protocol family and framing version
    frame 1      header JSON               a :data:`protocol.messages.Message`, at most
                                           ``max_header`` bytes; its ``blobs`` list names every
                                           following frame: name, byte length, sha256
    frame 2..n   blob 0 .. blob n-2        opaque bytes, usually safetensors payloads

Decoding checks, in this order, each failure with its own exception: the signature
(:class:`BadSignature`), the header size (:class:`HeaderTooLarge`), the header itself
(:class:`BadHeader`), the number of frames against the header's blob list
(:class:`FrameCountMismatch`), then each blob's length (:class:`BlobLengthMismatch`) and sha256
(:class:`BlobHashMismatch`). Blobs are handed out as memoryviews of the received frames, never
copied; senders pass them to ``send_multipart(..., copy=False)``.

A captured message is stored as ``EFEDMSG1`` followed by, for each frame, its 8-byte
little-endian length and bytes (:func:`save_message`, :func:`load_message`); ``edgefed-inspect``
reads that format.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from protocol.errors import (
    BadSignature,
    BlobHashMismatch,
    BlobLengthMismatch,
    FrameCountMismatch,
    FrameError,
    HeaderTooLarge,
)
from protocol.messages import BlobRef, Message, dump_header, parse_header

SIGNATURE = b"EFED/1"
MAX_HEADER = 64 * 1024
CAPTURE_MAGIC = b"EFEDMSG1"

Buffer = bytes | bytearray | memoryview


class _HasBuffer(Protocol):
    @property
    def buffer(self) -> memoryview: ...


FrameLike = Buffer | _HasBuffer


def _view(frame: FrameLike) -> memoryview:
    if isinstance(frame, bytes | bytearray | memoryview):
        return memoryview(frame)
    return frame.buffer  # zmq.Frame


HASH_ONCE_BYTES = 1 << 20
"""Immutable blobs at least this large are hashed once per object (:func:`blob_sha256`)."""
_HASH_SLOTS = 64
_hashes: OrderedDict[int, tuple[Buffer, str]] = OrderedDict()
_hash_lock = threading.Lock()


def _immutable(data: Buffer) -> bool:
    return isinstance(data, bytes) or (
        isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes)
    )


def blob_sha256(data: Buffer) -> str:
    """The sha256 of a blob. An immutable one (``bytes``, or a read-only view of ``bytes``) of
    :data:`HASH_ONCE_BYTES` or more is hashed once per object while that object lives: the same
    emulator bundle sent to a hundred agents is hashed once, not per send (a 7B model's is
    7.4 GB). Entries whose object nobody else holds any more are dropped as others are added."""
    view = memoryview(data)
    if view.nbytes < HASH_ONCE_BYTES or not _immutable(data):
        return hashlib.sha256(view).hexdigest()
    key = id(data)
    with _hash_lock:
        hit = _hashes.get(key)
        if hit is not None and hit[0] is data:
            _hashes.move_to_end(key)
            return hit[1]
    sha = hashlib.sha256(view).hexdigest()
    with _hash_lock:
        for old in [k for k, (obj, _) in _hashes.items() if sys.getrefcount(obj) <= 3]:
            del _hashes[old]  # held only by this cache (and this loop): let it go
        _hashes[key] = (data, sha)
        while len(_hashes) > _HASH_SLOTS:
            _hashes.popitem(last=False)
    return sha


def blob_ref(name: str, data: Buffer) -> BlobRef:
    return BlobRef(name=name, nbytes=memoryview(data).nbytes, sha256=blob_sha256(data))


def encode(header: BaseModel, blobs: Mapping[str, Buffer] | None = None) -> list[Buffer]:
    """Frames for ``header`` carrying ``blobs`` in order; the header's blob list is filled in."""
    blobs = blobs or {}
    refs = [blob_ref(name, data) for name, data in blobs.items()]
    if refs:
        header = header.model_copy(update={"blobs": refs})
    head = dump_header(header)
    if len(head) > MAX_HEADER:
        raise HeaderTooLarge(f"header of {len(head)} bytes exceeds {MAX_HEADER}")
    return [SIGNATURE, head, *blobs.values()]


@dataclass(frozen=True)
class Decoded:
    header: Message
    blobs: dict[str, memoryview]
    nbytes: int
    """Bytes of all frames of the message, as they travelled."""


def decode(frames: Sequence[FrameLike], *, max_header: int = MAX_HEADER) -> Decoded:
    """Validate and split a received message (without the ROUTER identity frame)."""
    if len(frames) < 2:
        raise FrameCountMismatch(f"a message has at least 2 frames, got {len(frames)}")
    views = [_view(f) for f in frames]
    if views[0] != SIGNATURE:
        raise BadSignature(f"bad signature {bytes(views[0][:16])!r}, expected {SIGNATURE!r}")
    if views[1].nbytes > max_header:
        raise HeaderTooLarge(f"header of {views[1].nbytes} bytes exceeds {max_header}")
    header = parse_header(views[1])
    refs = header.blobs
    if len(views) != 2 + len(refs):
        raise FrameCountMismatch(
            f"header lists {len(refs)} blobs but the message has {len(views) - 2} blob frames"
        )
    blobs: dict[str, memoryview] = {}
    for ref, view in zip(refs, views[2:], strict=True):
        if ref.name in blobs:
            raise FrameError(f"blob name {ref.name!r} appears twice")
        if view.nbytes != ref.nbytes:
            raise BlobLengthMismatch(
                f"blob {ref.name!r} is {view.nbytes} bytes, header says {ref.nbytes}"
            )
        if hashlib.sha256(view).hexdigest() != ref.sha256:
            raise BlobHashMismatch(f"blob {ref.name!r} does not match its sha256")
        blobs[ref.name] = view
    return Decoded(header=header, blobs=blobs, nbytes=sum(v.nbytes for v in views))


def frames_nbytes(frames: Sequence[FrameLike]) -> int:
    return sum(_view(f).nbytes for f in frames)


def save_message(path: Path, frames: Sequence[FrameLike]) -> None:
    """Capture a message to a file for ``edgefed-inspect``."""
    with open(path, "wb") as fh:
        fh.write(CAPTURE_MAGIC)
        for frame in frames:
            view = _view(frame)
            fh.write(struct.pack("<Q", view.nbytes))
            fh.write(view)


def load_message(path: Path, *, max_bytes: int = 1 << 34) -> list[bytes]:
    """Read a captured message back into its frames."""
    data = Path(path).read_bytes()
    if not data.startswith(CAPTURE_MAGIC):
        raise FrameError(f"{path} is not a captured edgefed message")
    frames: list[bytes] = []
    pos = len(CAPTURE_MAGIC)
    while pos < len(data):
        if pos + 8 > len(data):
            raise FrameError(f"{path}: truncated frame length at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if length > max_bytes or pos + length > len(data):
            raise FrameError(f"{path}: truncated frame at byte {pos}")
        frames.append(data[pos : pos + length])
        pos += length
    return frames
