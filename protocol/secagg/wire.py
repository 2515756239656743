"""How secure-aggregation stages travel in ordinary tasks and results.

The stages ride on the engine's existing exchanges, so no new message type is needed:

* advertise, share and unmask are ``score`` tasks whose ``params["secagg"]`` names the stage
  (with the roster or the unmask request); the agent answers with one JSON blob ``secagg``;
* mask is the ``train`` task itself: ``params["secagg"]`` carries the sealed shares addressed
  to the agent, and its result holds the blobs ``masked`` (the ring elements as little-endian
  uint64, exactly ``8 × length`` bytes) and ``layout`` (JSON: tensor names and shapes, in the
  order the vector concatenates them, and the payload kind and metadata), instead of the plain
  ``update``.

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


NO_UPDATE_METRIC = "out_of_sync"
"""A result whose metrics set this (Ferret's ``out_of_sync``: the agent could not reach the
round's global model) carries no update: it is masked with weight 0 and counts no examples."""


def masked_weight(num_examples: int, metrics: Mapping[str, float], *, dp: bool) -> int:
    """The integer an agent multiplies its update by before masking, and the examples the
    aggregator counts for it: 0 for a result with no update, 1 under DP-FedAvg (equal
    weights), else its example count (at least 1)."""
    if metrics.get(NO_UPDATE_METRIC):
        return 0
    return 1 if dp else max(int(num_examples), 1)


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


class Layout:
    """How a masked vector unpacks: tensor names and shapes in order, and the payload kind and
    caller metadata (e.g. SLoRA's mask seed and density) the aggregate is re-encoded with, so
    the method checks the unmasked aggregate as it checks any update. None of it is private:
    it is what the task fixed."""

    def __init__(
        self,
        entries: list[tuple[str, tuple[int, ...]]],
        kind: str = "lora",
        meta: dict[str, str] | None = None,
    ) -> None:
        self.entries = entries
        self.kind = kind
        self.meta = dict(meta or {})

    @property
    def length(self) -> int:
        total = 0
        for _, shape in self.entries:
            size = 1
            for d in shape:
                size *= d
            total += size
        return total

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.entries, self.kind, self.meta) == (
            other.entries, other.kind, other.meta,
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]


def layout_from(blob: bytes | memoryview) -> Layout:
    """The :class:`Layout` of a ``layout`` blob, checked for shape."""
    raw = load_json(blob)
    try:
        entries = [
            (str(n), tuple(int(d) for d in s))
            for n, s in zip(raw["names"], raw["shapes"], strict=True)
        ]
        kind = str(raw.get("kind", "lora"))
        meta = {str(k): str(v) for k, v in dict(raw.get("meta", {})).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SecAggError(f"malformed layout: {exc}") from None
    if any(d < 0 for _, s in entries for d in s) or len({n for n, _ in entries}) != len(entries):
        raise SecAggError("malformed layout: negative sizes or repeated names")
    return Layout(entries, kind, meta)


def layout_blob(layout: Layout) -> bytes:
    return dump_json(
        {
            "names": [n for n, _ in layout.entries],
            "shapes": [list(s) for _, s in layout.entries],
            "kind": layout.kind,
            "meta": layout.meta,
        }
    )
