"""Payload kinds and what each must satisfy: :class:`PayloadKind`, the receiver's :class:`Expect`,
the decoded :class:`Payload`, and the per-kind structure and expectation checks.

Used by :mod:`protocol.payloads` (which re-exports the three classes and documents the format):
:func:`check_structure` on both encode and decode, :func:`check_identity` and
:func:`check_expect` on decode when the receiver passes an :class:`Expect`. Errors are those of
:mod:`protocol._payload_checks`; a payload that is not what the receiver expects is a
:class:`~protocol.errors.PayloadMismatch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from protocol import _payload_checks as checks
from protocol import randomness
from protocol._payload_checks import (
    BASE_SEED_KEY,
    DENSITY_KEY,
    K_KEY,
    N_GROUPS_KEY,
    SEED_KEY,
    TensorSpec,
    lora_rank_of,
)
from protocol.errors import PayloadMismatch

__all__ = [
    "KIND_NAMES",
    "SEEDED_KINDS",
    "STACKED_KINDS",
    "Expect",
    "Payload",
    "PayloadKind",
    "check_expect",
    "check_identity",
    "check_structure",
    "structure",
]


class PayloadKind(StrEnum):
    LORA = "lora"
    MASKED = "masked"
    SPARSE = "sparse"
    SEEDCOEF = "seedcoef"
    DENSE = "dense"


KIND_NAMES = frozenset(k.value for k in PayloadKind)
STACKED_KINDS = frozenset({PayloadKind.LORA, PayloadKind.DENSE})
"""Kinds whose per-layer tensors are stored stacked (:mod:`protocol._stacking`)."""
SEEDED_KINDS = frozenset({PayloadKind.MASKED, PayloadKind.SEEDCOEF})
"""Kinds that depend on the shared-randomness version."""


@dataclass(frozen=True)
class Expect:
    """What a receiver expects of a payload; every field left ``None`` is not checked.

    ``tensors`` gives the exact set of tensor names as decoded, with shapes (``None`` = free,
    e.g. a LoRA rank) and dtypes; for ``masked`` those are the 1-D value vectors, for
    ``sparse`` the ``.indices``/``.values`` entries. ``shapes`` gives the full shapes of a
    ``masked`` or ``sparse`` payload (exact name set). Given any ``Expect``, a ``masked``
    payload's value counts are checked against the regenerated masks; pass ``shapes`` for
    payloads from untrusted senders, otherwise the masks are regenerated over whatever sizes
    the payload claims (up to 2^40 elements per tensor).
    """

    kind: PayloadKind | None = None
    method: str | None = None
    round: int | None = None
    tensors: Mapping[str, TensorSpec] | None = None
    max_rank: int | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int | None = None
    density: float | None = None
    base_seed: int | None = None
    k: int | None = None
    n_groups: int | None = None


@dataclass
class Payload:
    """A decoded, checked payload."""

    kind: PayloadKind
    method: str
    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    raw_nbytes: int
    """Sum of the tensor data bytes."""
    wire_nbytes: int
    """Length of the encoded bytes."""
    header_nbytes: int = 0
    """Bytes before the tensor data: 8 + the JSON header."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Full tensor shapes of a ``masked`` or ``sparse`` payload."""
    square_sums: dict[str, float] = field(default_factory=dict)
    """Per float32 tensor, the float32 sum of its values' squares, as the finite check
    computed it (``protocol._payload_checks.square_sums``: finite, and accurate to a relative
    ``n·2⁻²⁴/(1 − n·2⁻²⁴)`` for ``n`` values; a tensor whose squares overflowed has ``inf``)."""

    @property
    def overhead_nbytes(self) -> int:
        return self.wire_nbytes - self.raw_nbytes

    def _int(self, key: str) -> int | None:
        return int(self.meta[key]) if key in self.meta else None

    @property
    def seed(self) -> int | None:
        """The mask seed of a ``masked`` payload."""
        return self._int(SEED_KEY)

    @property
    def density(self) -> float | None:
        return float(self.meta[DENSITY_KEY]) if DENSITY_KEY in self.meta else None

    @property
    def base_seed(self) -> int | None:
        return self._int(BASE_SEED_KEY)

    @property
    def k(self) -> int | None:
        return self._int(K_KEY)

    @property
    def n_groups(self) -> int | None:
        return self._int(N_GROUPS_KEY)


def structure(
    kind: PayloadKind, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Check the tensors and metadata a payload of ``kind`` must have; the full shapes of a
    ``masked`` or ``sparse`` payload (else ``{}``) and the ranks of a ``lora`` one (else
    ``{}``; :func:`lora_rank_of`, found once per payload)."""
    if kind in SEEDED_KINDS:
        checks.check_randomness_version(meta)
    if kind is PayloadKind.LORA:
        return {}, lora_rank_of(tensors)
    if kind is PayloadKind.MASKED:
        return checks.check_masked(tensors, meta), {}
    if kind is PayloadKind.SPARSE:
        return checks.check_sparse(tensors, meta), {}
    if kind is PayloadKind.SEEDCOEF:
        checks.check_seedcoef(tensors, meta)
    return {}, {}


def check_structure(
    kind: PayloadKind, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    """:func:`structure`'s full shapes of a ``masked`` or ``sparse`` payload, else ``{}``."""
    return structure(kind, tensors, meta)[0]


def check_identity(expect: Expect, kind: PayloadKind, method: str, round_: int) -> None:
    """Check a payload's kind, method and round against the receiver's :class:`Expect`."""
    if expect.kind is not None and kind != expect.kind:
        raise PayloadMismatch(f"payload kind {kind.value!r}, expected {str(expect.kind)!r}")
    if expect.method is not None and method != expect.method:
        raise PayloadMismatch(f"payload method {method!r}, expected {expect.method!r}")
    if expect.round is not None and round_ != expect.round:
        raise PayloadMismatch(f"payload round {round_}, expected {expect.round}")


def check_expect(
    expect: Expect,
    kind: PayloadKind,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    ranks: Mapping[str, int] | None = None,
) -> None:
    """Check a structurally valid payload's tensors and parameters against :class:`Expect`
    (``ranks``: a ``lora`` payload's, as :func:`structure` found them; else found here)."""
    if expect.tensors is not None:
        checks.check_specs(tensors, expect.tensors)
    if expect.max_rank is not None and kind is PayloadKind.LORA:
        for module, rank in (lora_rank_of(tensors) if ranks is None else ranks).items():
            if rank > expect.max_rank:
                raise PayloadMismatch(f"{module}: rank {rank} exceeds {expect.max_rank}")
    if expect.shapes is not None and kind in (PayloadKind.MASKED, PayloadKind.SPARSE):
        want = {name: tuple(shape) for name, shape in expect.shapes.items()}
        if dict(shapes) != want:
            raise PayloadMismatch(checks.describe_difference("full shapes", shapes, want))
    for key, wanted, kinds in (
        (SEED_KEY, expect.seed, {PayloadKind.MASKED}),
        (DENSITY_KEY, expect.density, {PayloadKind.MASKED}),
        (BASE_SEED_KEY, expect.base_seed, {PayloadKind.SEEDCOEF}),
        (K_KEY, expect.k, {PayloadKind.SEEDCOEF}),
        (N_GROUPS_KEY, expect.n_groups, {PayloadKind.SEEDCOEF}),
    ):
        if wanted is not None and kind in kinds:
            got = float(meta[key]) if key == DENSITY_KEY else int(meta[key])
            if got != wanted:
                raise PayloadMismatch(f"{key} is {meta[key]}, expected {wanted}")
    if kind is PayloadKind.MASKED:
        seed, density = int(meta[SEED_KEY]), float(meta[DENSITY_KEY])
        for name, shape in shapes.items():
            stream = randomness.stream_key(seed, name)
            want_count = randomness.mask_count(stream, math.prod(shape), density)
            got_count = tensors[name].numel()
            if got_count != want_count:
                raise PayloadMismatch(
                    f"{name!r}: {got_count} masked values, the mask selects {want_count}"
                )
