"""Safe reading and writing of safetensors bytes, the container of every edgefed payload.

Layout of a safetensors buffer::

    bytes 0..8        N, the JSON header length, unsigned 64-bit little-endian
    bytes 8..8+N      JSON object: {"__metadata__": {str: str}, name: {"dtype": "F32",
                      "shape": [..], "data_offsets": [begin, end]}, ...}, padded with spaces
    bytes 8+N..       tensor data, little-endian, offsets relative to this point

Reading never trusts the header: the length is read and capped before anything is parsed, the
JSON is parsed strictly (no duplicate keys, no NaN), and every entry is checked (known dtype,
non-negative shape, ``numel * itemsize == end - begin``, entries contiguous from 0 to the end of
the buffer with no gap or overlap) before any tensor is built. Tensors are then built with one
copy of their bytes each (:func:`load_tensors`), never through pickle.

Writing (:func:`serialize`) produces the same format byte for byte deterministically: metadata
keys sorted, entries ordered by item size (largest first, so data stays aligned) then name, the
JSON padded with spaces to a multiple of 8. ``safetensors.torch.save`` orders metadata keys
differently in every process, which would give one payload many sha256 digests. Hosts are
assumed little-endian (every platform edgefed targets); the data section is read and written
as is.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol.errors import PayloadError, PayloadHeaderTooLarge

Buffer = bytes | bytearray | memoryview

PAYLOAD_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The dtypes a payload may carry, by safetensors code."""

DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in PAYLOAD_DTYPES.items()}

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
"""Byte size of every safetensors dtype (for inspecting files that are not payloads)."""

MAX_DIMS = 8
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class Entry:
    """One tensor as described by a checked header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked safetensors header."""

    raw: dict[str, Any]
    """The header JSON as parsed."""
    entries: tuple[Entry, ...]
    """In data order (ascending offsets)."""
    metadata: dict[str, str]
    header_nbytes: int
    """Bytes before the tensor data: 8 + the JSON length."""
    data_nbytes: int
    """Bytes of tensor data."""

    @property
    def total_nbytes(self) -> int:
        return self.header_nbytes + self.data_nbytes


def _as_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def header_length(data: Buffer, *, max_header: int) -> int:
    """The JSON header length N from the first 8 bytes, refused above ``max_header``."""
    view = _as_view(data)
    if view.nbytes < 8:
        raise PayloadError(f"{view.nbytes} bytes: too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > max_header:
        raise PayloadHeaderTooLarge(f"header of {n} bytes exceeds the cap of {max_header}")
    return int(n)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PayloadError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise PayloadError(f"{name} in header")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: Any, dtypes: Mapping[str, int]) -> Entry:
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise PayloadError(f"{name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise PayloadError(f"{name!r}: dtype {dtype!r} is not accepted")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise PayloadError(f"{name!r}: shape {shape!r} is not a list of at most {MAX_DIMS} sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise PayloadError(f"{name!r}: data_offsets {offsets!r} are not [begin, end]")
    entry = Entry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.numel * dtypes[dtype] != entry.nbytes:
        raise PayloadError(
            f"{name!r}: shape {shape} of {dtype} needs {entry.numel * dtypes[dtype]} bytes, "
            f"offsets span {entry.nbytes}"
        )
    return entry


def parse_header(
    data: Buffer,
    *,
    max_header: int,
    total_nbytes: int | None = None,
    dtypes: Mapping[str, int] | None = None,
) -> Header:
    """Check and parse the header of a safetensors buffer.

    ``data`` is the whole buffer, or only its first 8 + N bytes when ``total_nbytes`` gives the
    whole size (inspecting a large file). ``dtypes`` maps accepted dtype codes to item sizes;
    by default only :data:`PAYLOAD_DTYPES`.
    """
    view = _as_view(data)
    n = header_length(view, max_header=max_header)
    total = view.nbytes if total_nbytes is None else total_nbytes
    if 8 + n > min(total, view.nbytes):
        raise PayloadError(f"header of {n} bytes runs past the end ({total} bytes)")
    accepted = dtypes if dtypes is not None else {k: ITEMSIZE[k] for k in PAYLOAD_DTYPES}
    try:
        text = bytes(view[8 : 8 + n]).decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"header is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PayloadError("header is not a JSON object")
    metadata = raw.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError("__metadata__ must map strings to strings")
    entries = sorted(
        (_entry(name, info, accepted) for name, info in raw.items() if name != METADATA_KEY),
        key=lambda e: (e.begin, e.end),
    )
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise PayloadError(
                f"{entry.name!r}: data starts at {entry.begin}, expected {position} "
                "(gap or overlap)"
            )
        position = entry.end
    data_nbytes = total - 8 - n
    if position != data_nbytes:
        raise PayloadError(f"tensors cover {position} bytes of data, the buffer has {data_nbytes}")
    return Header(raw, tuple(entries), dict(metadata), 8 + n, data_nbytes)


def load_tensors(data: Buffer, header: Header, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """Build the tensors of a buffer whose header was checked by :func:`parse_header`.

    The data area is copied once, writable; each tensor is a view of exactly its bytes in
    that copy (so the finite check can treat layers that lie back to back as one block, see
    ``entry_square_sums``). ``copy=False`` with a writable buffer: no copy, the tensors are
    views of ``data`` itself (the caller keeps it unchanged while they live, and does not
    write to them where ``data`` is still read elsewhere); a read-only buffer is copied.
    """
    view = _as_view(data)
    if view.nbytes != header.total_nbytes:
        raise PayloadError(
            f"buffer has {view.nbytes} bytes, header describes {header.total_nbytes}"
        )
    base = header.header_nbytes
    out: dict[str, torch.Tensor] = {}
    area = None
    if view.nbytes > base:
        # numpy's copy releases the GIL (bytearray's does not): decode-ahead and the log's
        # writer run meanwhile
        raw_area = np.frombuffer(view, np.uint8, offset=base)
        area = torch.from_numpy(raw_area if not copy and not view.readonly else raw_area.copy())
    for e in header.entries:
        dtype = PAYLOAD_DTYPES[e.dtype]
        if e.numel == 0 or area is None:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
            continue
        raw = area[e.begin : e.end]
        if dtype is torch.bool and bool((raw > 1).any()):
            raise PayloadError(f"{e.name!r}: bool tensor holds bytes other than 0 and 1")
        if e.begin % dtype.itemsize:
            raw = raw.clone()  # misaligned for its dtype (not what encode writes): its own copy
        out[e.name] = raw.view(dtype).reshape(e.shape)
    return out


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Deterministic safetensors bytes of ``tensors`` (any device, any layout) and metadata."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = {k: metadata[k] for k in sorted(metadata)}
    chunks: list[memoryview] = []
    position = 0
    for name in order:
        t = tensors[name]
        chunk = _raw_bytes(t)
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [position, position + chunk.nbytes],
        }
        position += chunk.nbytes
        chunks.append(chunk)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *chunks])
