"""Fixed-point encoding of float updates into the ring of integers modulo 2**64.

Masks are added in a ring, so a float update is first mapped to integers: ``v = round(x *
2**fraction_bits)``, kept as a two's-complement ``uint64``. Sums wrap modulo 2**64 exactly as
masks do, and the unmasked sum is read back as a signed integer and divided by the scale.

Range and overflow (the documented contract):

* every value an agent encodes must satisfy ``|x| <= clip_range``; an agent refuses to encode
  a larger one (:class:`~protocol.secagg.errors.SecAggError`), it never clips silently;
* the aggregator checks at configuration time that ``max_agents * clip_range * 2**fraction_bits
  < 2**63``, so the sum of every agent's values cannot wrap (:func:`check_capacity`).

Error: rounding moves each encoded value by at most ``2**-(fraction_bits + 1)``, so the decoded
sum of ``n`` agents differs from the float64 sum by at most ``n * 2**-(fraction_bits + 1)`` per
element (:func:`sum_error_bound`). With the default 24 fraction bits that is 3.0e-8 per agent.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocol.secagg.errors import SecAggError

DEFAULT_FRACTION_BITS = 24
MODULUS_BITS = 64


def check_capacity(max_agents: int, clip_range: float, fraction_bits: int) -> None:
    """Raise unless ``max_agents`` values of magnitude ``clip_range`` sum without wrapping."""
    if max_agents < 1 or clip_range <= 0 or not 0 <= fraction_bits <= 52:
        raise SecAggError("need max_agents >= 1, clip_range > 0 and 0 <= fraction_bits <= 52")
    worst = max_agents * clip_range * 2.0**fraction_bits
    if worst >= 2.0 ** (MODULUS_BITS - 1):
        raise SecAggError(
            f"{max_agents} agents x range {clip_range:g} x 2**{fraction_bits} = {worst:.3g} "
            f"overflows the 2**63 signed range: lower clip_range or fraction_bits"
        )


def sum_error_bound(agents: int, fraction_bits: int) -> float:
    """Largest per-element difference between the decoded and the float64 sum."""
    return agents * 2.0 ** -(fraction_bits + 1)


def encode(
    values: npt.NDArray[np.floating], clip_range: float, fraction_bits: int
) -> npt.NDArray[np.uint64]:
    """Float values to ring elements; :class:`SecAggError` if any is out of range or not finite."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise SecAggError("an update holds NaN or infinity")
    if x.size and float(np.max(np.abs(x))) > clip_range:
        raise SecAggError(
            f"an update value {float(np.max(np.abs(x))):.4g} lies outside the secure-aggregation "
            f"range ±{clip_range:g} ([privacy] clip_range)"
        )
    scaled = np.rint(x * 2.0**fraction_bits).astype(np.int64)
    return scaled.view(np.uint64)


def decode(ring: npt.NDArray[np.uint64], fraction_bits: int) -> npt.NDArray[np.float64]:
    """Ring elements (a sum) back to float64, reading them as signed 64-bit integers."""
    signed = np.asarray(ring, dtype=np.uint64).view(np.int64)
    return signed.astype(np.float64) / 2.0**fraction_bits
