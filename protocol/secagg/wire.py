"""How secure-aggregation stages travel in ordinary tasks and results.

The stages ride on the engine's existing exchanges, so no new message type is needed:

* advertise, share and unmask are ``score`` tasks whose ``params["secagg"]`` names the stage
  (with the roster or the unmask request); the agent answers with one JSON blob ``secagg``;
* mask is the ``train`` task itself: ``params["secagg"]`` carries the sealed shares addressed
  to the agent, and its result holds the blobs ``masked`` (the ring elements as little-endian
  uint64, exactly ``8 × length`` bytes) and ``layout`` (JSON: tensor names and shapes, in the
  order the vector concatenates them), instead of the plain ``update``.

``params["secagg"]`` always holds ``stage``, ``agent`` (the id the agent masks as),
``context`` (binds keys and shares to this round) and ``config`` (:class:`SecAggConfig`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.secagg.errors import SecAggError

PARAM = "secagg"
BLOB = "secagg"
MASKED_BLOB = "masked"
LAYOUT_BLOB = "layout"
MAX_JSON = 4 << 20


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A task's method parameters without the secure-aggregation entry, and that entry."""
    rest = {k: v for k, v in params.items() if k != PARAM}
    entry = params.get(PARAM)
    if entry is not None and not isinstance(entry, dict):
        raise SecAggError("params.secagg must be a mapping")
    return rest, entry


def dump_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def load_json(blob: bytes | memoryview) -> Any:
    if len(blob) > MAX_JSON:
        raise SecAggError(f"a secure-aggregation blob exceeds {MAX_JSON} bytes")
    try:
        return json.loads(bytes(blob))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SecAggError(f"a secure-aggregation blob is not JSON: {exc}") from None


def vector_bytes(vector: npt.NDArray[np.uint64]) -> bytes:
    return vector.astype("<u8").tobytes()


def vector_from(blob: bytes | memoryview, length: int | None) -> npt.NDArray[np.uint64]:
    if len(blob) % 8 or (length is not None and len(blob) != 8 * length):
        raise SecAggError(f"a masked vector of {len(blob)} bytes, expected {length} × 8")
    return np.frombuffer(bytes(blob), dtype="<u8").astype(np.uint64)


def layout_from(blob: bytes | memoryview) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) list of a ``layout`` blob, checked for shape."""
    raw = load_json(blob)
    try:
        layout = [
            (str(n), tuple(int(d) for d in s))
            for n, s in zip(raw["names"], raw["shapes"], strict=True)
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise SecAggError(f"malformed layout: {exc}") from None
    if any(d < 0 for _, s in layout for d in s) or len({n for n, _ in layout}) != len(layout):
        raise SecAggError("malformed layout: negative sizes or repeated names")
    return layout


def layout_blob(layout: list[tuple[str, tuple[int, ...]]]) -> bytes:
    return dump_json({"names": [n for n, _ in layout], "shapes": [list(s) for _, s in layout]})
