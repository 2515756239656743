"""Privacy entries a task may carry beside its method parameters.

``params["secagg"]`` (secure aggregation, :mod:`protocol.secagg.wire`) and ``params["dp"]``
(client-level DP: ``{"clip": C, "noise_std": s}``, the L2 bound on the agent's update and the
standard deviation of the Gaussian noise the agent adds itself, 0 when the aggregator adds it)
are read by the agent's privacy wrapper; the method sees its parameters without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from protocol.errors import ErrorCode, ProtocolError

KEYS = ("secagg", "dp")


class BadPrivacyEntry(ProtocolError):
    code = ErrorCode.BAD_HEADER


def method_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A task's parameters without its privacy entries (what the method validates)."""
    return {k: v for k, v in params.items() if k not in KEYS}


def dp_entry(params: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(clip, noise_std)`` of a task's ``dp`` entry, or None when it has none."""
    entry = params.get("dp")
    if entry is None:
        return None
    try:
        clip, std = float(entry["clip"]), float(entry["noise_std"])
    except (KeyError, TypeError, ValueError):
        raise BadPrivacyEntry("params.dp needs numbers clip and noise_std") from None
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(std) and std >= 0):
        raise BadPrivacyEntry("params.dp: clip must be > 0 and noise_std >= 0")
    return clip, std
