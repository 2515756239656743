"""Shamir secret sharing over the prime field GF(2**521 - 1).

This is arithmetic, not a cryptographic primitive: a secret ``s`` (an integer below the prime)
becomes the constant term of a random polynomial ``f`` of degree ``threshold - 1``, and share
``x`` is ``(x, f(x))``. Any ``threshold`` shares give ``s`` back by Lagrange interpolation at
zero; fewer say nothing about it. The coefficients come from :mod:`secrets`.

The prime is the Mersenne prime 2**521 - 1, so a 32-byte key (256 bits) is always a field
element. Shares travel as fixed-width big-endian bytes: 2 bytes of ``x`` then 66 of ``y``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from protocol.secagg.errors import SecAggError

PRIME = 2**521 - 1
_Y_BYTES = 66
SHARE_BYTES = 2 + _Y_BYTES
MAX_SHARES = 65_535


def split(secret: bytes, count: int, threshold: int) -> list[bytes]:
    """Split ``secret`` (at most 64 bytes) into ``count`` shares, any ``threshold`` of which
    recover it. Share ``i`` (0-based) is the polynomial at ``x = i + 1``."""
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise SecAggError(f"need 1 <= threshold ({threshold}) <= shares ({count}) <= {MAX_SHARES}")
    if len(secret) > 64:
        raise SecAggError("a Shamir secret is at most 64 bytes")
    value = int.from_bytes(secret, "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(x.to_bytes(2, "big") + y.to_bytes(_Y_BYTES, "big"))
    return shares


def combine(shares: Sequence[bytes], threshold: int, length: int) -> bytes:
    """Recover a ``length``-byte secret from at least ``threshold`` distinct shares."""
    points: dict[int, int] = {}
    for share in shares:
        if len(share) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
        x = int.from_bytes(share[:2], "big")
        y = int.from_bytes(share[2:], "big")
        if x == 0 or y >= PRIME:
            raise SecAggError("malformed share")
        if points.setdefault(x, y) != y:
            raise SecAggError(f"two different shares claim x = {x}")
    if len(points) < threshold:
        raise SecAggError(f"{len(points)} shares, {threshold} needed")
    ordered = sorted(points.items())
    chosen = ordered[:threshold]
    secret = _at(chosen, 0)
    # more shares than needed: one more must lie on the polynomial the chosen ones define (an
    # altered chosen share moves the polynomial off every honest share, so one check finds it;
    # an altered share not chosen does not change the secret); with exactly ``threshold``
    # shares nothing can tell
    for x, y in ordered[threshold : threshold + 1]:
        if _at(chosen, x) != y:
            raise SecAggError(
                f"the shares do not agree (the share at x = {x} is off the polynomial the "
                "others define): one was altered"
            )
    if secret >= 1 << (8 * length):
        raise SecAggError("the shares do not agree on a secret of that length")
    return secret.to_bytes(length, "big")


def _at(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial through ``points`` (Lagrange, mod :data:`PRIME`)."""
    value = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (x - xm) % PRIME
                den = den * (xj - xm) % PRIME
        value = (value + yj * num * pow(den, -1, PRIME)) % PRIME
    return value
