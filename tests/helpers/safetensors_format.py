"""Sizes from the safetensors format itself, not from the code under test.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (padded with
spaces to a multiple of 8), then the tensors' raw little-endian bytes at their
``data_offsets``. The JSON is compact (no spaces), ``__metadata__`` holds strings only.
"""

from __future__ import annotations

import json
import struct
from typing import Any


def header_json(
    metadata: dict[str, str], tensors: dict[str, tuple[str, list[int], int]]
) -> dict[str, Any]:
    """The header a writer must produce: ``tensors`` maps name -> (dtype, shape, nbytes), laid
    out in name order."""
    out: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, nbytes = tensors[name]
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return out


def header_frame_nbytes(header: dict[str, Any]) -> int:
    """8 length bytes + the compact JSON padded to a multiple of 8."""
    n = len(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    return 8 + (n + 7) // 8 * 8


def parse(blob: bytes) -> tuple[dict[str, Any], int]:
    """The header of a safetensors blob as JSON, and the bytes its length field says it takes."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), 8 + n
