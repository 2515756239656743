"""Payload codecs: the tensor blobs that travel in edgefed messages.

A payload is safetensors bytes whose ``__metadata__`` says what it is:

=====================  ========================================================================
key                    value (all strings)
=====================  ========================================================================
``edgefed.kind``       a :class:`PayloadKind`
``edgefed.method``     method name (``[a-z0-9_]{1,32}``)
``edgefed.round``      round number, decimal
``edgefed.randomness`` shared-randomness version (``masked``, ``seedcoef``)
``edgefed.seed``       ``masked``: the mask seed; ``edgefed.density``: the mask density
``edgefed.shapes``     ``masked``, ``sparse``: JSON ``{name: [full shape]}``
``edgefed.base_seed``  ``seedcoef``: the round's base seed; ``edgefed.k``: the seed pool size K;
                       ``edgefed.n_groups``: the number of parameter groups
``edgefed.stacked``    per-layer tensors stored stacked (:mod:`protocol._stacking`)
=====================  ========================================================================

Kinds and their tensors:

- ``lora``: peft adapter state (``get_peft_model_state_dict`` names): ``<module>.lora_A.weight``
  ``[r, in]`` and ``<module>.lora_B.weight`` ``[out, r]``; ranks may differ per module.
- ``masked``: one 1-D vector per tensor name, the values at the positions the seeded mask
  selects (``randomness.mask_indices(stream_key(seed, name), numel, density)``), row-major.
  Exactly ``4 * sum(mask counts)`` bytes of float32 data, no indices.
- ``sparse``: ``<name>.indices`` (int64 or int32, flat row-major, strictly increasing) and
  ``<name>.values`` per tensor.
- ``seedcoef``: three 1-D tensors ``group`` (int32), ``seed`` (int32), ``value`` (float32):
  Ferret's (group, seed index, coefficient) triples, never a dense K x groups matrix.
- ``dense``: plain named tensors.

:func:`decode` reads the 8-byte header length and refuses it above the cap before parsing,
checks the header (:mod:`protocol._safetensors_io`), then the kind's structure, the receiver's
:class:`Expect` (:mod:`protocol._payload_kinds`), and that every floating value is finite.
:func:`encode` runs the same checks, so a sender learns of a bad update before it travels.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from protocol import _payload_checks as checks
from protocol import randomness
from protocol._payload_checks import (
    BASE_SEED_KEY,
    DENSITY_KEY,
    K_KEY,
    KIND_KEY,
    METHOD_KEY,
    N_GROUPS_KEY,
    RANDOMNESS_KEY,
    ROUND_KEY,
    SEED_KEY,
    SHAPES_KEY,
    TensorSpec,
    lora_rank_of,
)
from protocol._payload_kinds import (
    KIND_NAMES,
    SEEDED_KINDS,
    STACKED_KINDS,
    Expect,
    Payload,
    PayloadKind,
    check_expect,
    check_identity,
    check_structure,
    structure,
)
from protocol._safetensors_io import (
    DTYPE_CODES,
    METADATA_KEY,
    Buffer,
    header_length,
    parse_header,
    serialize,
)
from protocol._safetensors_io import load_tensors as _load_tensors
from protocol._stacking import STACKED_KEY, stack, unstack_origins
from protocol.errors import PayloadError, PayloadHeaderTooLarge, PayloadMismatch

__all__ = [
    "MAX_PAYLOAD_HEADER",
    "Buffer",
    "Expect",
    "Payload",
    "PayloadKind",
    "TensorSpec",
    "caller_meta",
    "decode",
    "encode",
    "encode_dense",
    "encode_lora",
    "encode_masked",
    "encode_seedcoef",
    "encode_sparse",
    "lora_rank_of",
    "read_header",
]

logger = logging.getLogger(__name__)

MAX_PAYLOAD_HEADER = 256 * 1024
"""Cap on the safetensors JSON header of a payload, in bytes."""

_SET_BY_ENCODE = frozenset({KIND_KEY, METHOD_KEY, ROUND_KEY, RANDOMNESS_KEY, STACKED_KEY})
_DIGITS = re.compile(r"([0-9]+)")


# --- encoding ---------------------------------------------------------------------------------


def encode(
    kind: PayloadKind | str,
    tensors: Mapping[str, torch.Tensor],
    *,
    method: str,
    round: int,
    meta: Mapping[str, str] | None = None,
) -> bytes:
    """Checked safetensors bytes of a payload of ``kind``.

    ``meta`` may hold the kind's own keys (``edgefed.seed`` ...) and free keys of the caller;
    kind, method, round, randomness version and stacking are set here.
    """
    try:
        kind = PayloadKind(kind)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind!r}") from None
    checks.check_method_round(method, round)
    full: dict[str, str] = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PayloadError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key in _SET_BY_ENCODE:
            raise PayloadError(f"metadata key {key!r} is set by encode")
        full[key] = value
    full |= {KIND_KEY: kind.value, METHOD_KEY: method, ROUND_KEY: str(round)}
    if kind in SEEDED_KINDS:
        full[RANDOMNESS_KEY] = str(randomness.VERSION)
    ready: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise PayloadError(f"tensors must map names to torch tensors, got {name!r}")
        if name == METADATA_KEY:
            raise PayloadError(f"{METADATA_KEY!r} cannot name a tensor")
        if t.dtype not in DTYPE_CODES:
            raise PayloadError(f"{name!r}: dtype {t.dtype} cannot travel in a payload")
        ready[name] = t.detach().to("cpu")
    check_structure(kind, ready, full)
    checks.check_finite(ready)
    entries = ready
    if kind in STACKED_KINDS:
        entries, spec = stack(ready)
        if spec is not None:
            full[STACKED_KEY] = spec
    data = serialize(entries, full)
    n = header_length(data, max_header=len(data))
    if n > MAX_PAYLOAD_HEADER:
        raise PayloadHeaderTooLarge(f"payload header of {n} bytes exceeds {MAX_PAYLOAD_HEADER}")
    return data


def caller_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """A decoded payload's metadata without the keys :func:`encode` sets itself, so that
    ``encode(p.kind, tensors, method=p.method, round=p.round, meta=caller_meta(p.meta))``
    writes a payload of the same kind and parameters with other numbers."""
    return {k: v for k, v in meta.items() if k not in _SET_BY_ENCODE}


def encode_lora(state: Mapping[str, torch.Tensor], *, method: str, round: int) -> bytes:
    """A ``lora`` payload of a peft adapter state dict."""
    return encode(PayloadKind.LORA, state, method=method, round=round)


def encode_masked(
    values: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int,
    density: float,
    method: str,
    round: int,
) -> bytes:
    """A ``masked`` payload: per tensor, the values at its seeded mask positions."""
    meta = {
        SEED_KEY: str(int(seed)),
        DENSITY_KEY: repr(float(density)),
        SHAPES_KEY: checks.dump_shapes(shapes),
    }
    return encode(PayloadKind.MASKED, values, method=method, round=round, meta=meta)


def encode_sparse(
    indices: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    method: str,
    round: int,
) -> bytes:
    """A ``sparse`` payload: per tensor, strictly increasing flat indices and their values."""
    if set(indices) != set(values):
        raise PayloadMismatch("indices and values name different tensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in indices:
        tensors[f"{name}.indices"] = indices[name]
        tensors[f"{name}.values"] = values[name]
    meta = {SHAPES_KEY: checks.dump_shapes(shapes)}
    return encode(PayloadKind.SPARSE, tensors, method=method, round=round, meta=meta)


def encode_seedcoef(
    group: torch.Tensor,
    seed_index: torch.Tensor,
    value: torch.Tensor,
    *,
    base_seed: int,
    k: int,
    n_groups: int,
    method: str,
    round: int,
) -> bytes:
    """A ``seedcoef`` payload of (group, seed index, coefficient) triples."""
    tensors = {
        "group": group.to(torch.int32),
        "seed": seed_index.to(torch.int32),
        "value": value.to(torch.float32),
    }
    meta = {BASE_SEED_KEY: str(int(base_seed)), K_KEY: str(int(k)), N_GROUPS_KEY: str(n_groups)}
    return encode(PayloadKind.SEEDCOEF, tensors, method=method, round=round, meta=meta)


def encode_dense(
    tensors: Mapping[str, torch.Tensor],
    *,
    method: str,
    round: int,
    meta: Mapping[str, str] | None = None,
) -> bytes:
    """A ``dense`` payload of plain named tensors."""
    return encode(PayloadKind.DENSE, tensors, method=method, round=round, meta=meta)


# --- decoding ---------------------------------------------------------------------------------


def read_header(
    data: Buffer, *, max_header: int = MAX_PAYLOAD_HEADER, total_nbytes: int | None = None
) -> tuple[dict[str, Any], int]:
    """The checked header JSON of a payload and the bytes before its tensor data (8 + N).

    ``data`` may be only the first bytes of a file when ``total_nbytes`` gives its size.
    """
    header = parse_header(data, max_header=max_header, total_nbytes=total_nbytes)
    return header.raw, header.header_nbytes


def decode(
    data: Buffer,
    expect: Expect | None = None,
    *,
    max_header: int = MAX_PAYLOAD_HEADER,
    copy: bool = True,
) -> Payload:
    """Parse and check a payload; raises a :class:`~protocol.errors.PayloadError` subclass.

    The tensors are views of one writable copy of the data area; ``copy=False`` makes them
    views of ``data`` itself when it is writable (no copy: the caller keeps ``data`` unchanged
    while they live and never writes to them where ``data`` is read elsewhere)."""
    header = parse_header(data, max_header=max_header)
    meta = header.metadata
    kind_name, method, round_ = checks.identity(meta, KIND_NAMES)
    kind = PayloadKind(kind_name)
    if expect is not None:
        check_identity(expect, kind, method, round_)
    entries = _load_tensors(data, header, copy=copy)
    flat, origins = unstack_origins(entries, meta.get(STACKED_KEY))
    tensors = {name: flat[name] for name in sorted(flat, key=_natural)}
    shapes, ranks = structure(kind, tensors, meta)
    if expect is not None:
        check_expect(expect, kind, tensors, meta, shapes, ranks)
    sums = checks.check_finite(tensors, checks.entry_square_sums(entries, origins))
    logger.debug(
        "decoded %s payload: %d tensors, %d bytes", kind, len(tensors), header.total_nbytes
    )
    return Payload(
        kind=kind,
        method=method,
        round=round_,
        tensors=tensors,
        meta=dict(meta),
        raw_nbytes=header.data_nbytes,
        wire_nbytes=header.total_nbytes,
        header_nbytes=header.header_nbytes,
        shapes=shapes,
        square_sums=sums,
    )


@functools.lru_cache(maxsize=1 << 14)
def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10`` (cached: every update of a run names
    the same tensors)."""
    return tuple((0, int(p)) if p.isdecimal() else (1, p) for p in _DIGITS.split(name) if p)
