"""Structure checks of payload kinds: metadata fields, names, shapes, dtypes, indices, finiteness.

Used by :mod:`protocol.payloads` on both encode and decode. Errors: malformed metadata is a
:class:`PayloadError`; tensors that are not what the kind or the receiver expects are a
:class:`PayloadMismatch`; indices outside their range, duplicated or unsorted are
:class:`IndexOutOfRange`; NaN or infinity is :class:`NotFinite`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol import randomness
from protocol.errors import IndexOutOfRange, NotFinite, PayloadError, PayloadMismatch

KIND_KEY = "edgefed.kind"
METHOD_KEY = "edgefed.method"
ROUND_KEY = "edgefed.round"
RANDOMNESS_KEY = "edgefed.randomness"
SEED_KEY = "edgefed.seed"
DENSITY_KEY = "edgefed.density"
SHAPES_KEY = "edgefed.shapes"
BASE_SEED_KEY = "edgefed.base_seed"
K_KEY = "edgefed.k"
N_GROUPS_KEY = "edgefed.n_groups"

MAX_ROUND = 2**31
MAX_NUMEL = 2**40
"""Largest full tensor a ``masked``/``sparse`` payload may describe."""
MAX_POOL = 2**31 - 1
"""Largest seed pool K and group count of a ``seedcoef`` payload (int32 indices)."""

_METHOD = re.compile(r"[a-z0-9_]{1,32}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_LORA_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
_INDEX_DTYPES = (torch.int64, torch.int32)
_SEEDCOEF_DTYPES = {"group": torch.int32, "seed": torch.int32, "value": torch.float32}


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape (``None`` = free dimension, e.g. a LoRA rank) and dtype of one tensor."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype


# --- metadata ---------------------------------------------------------------------------------


def check_method_round(method: object, round_: object) -> None:
    if not isinstance(method, str) or _METHOD.fullmatch(method) is None:
        raise PayloadError(f"method {method!r} is not 1-32 characters of [a-z0-9_]")
    if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ <= MAX_ROUND:
        raise PayloadError(f"round {round_!r} is not an integer in [0, {MAX_ROUND}]")


def meta_int(meta: Mapping[str, str], key: str, lo: int, hi: int) -> int:
    text = meta.get(key)
    if text is None:
        raise PayloadError(f"metadata lacks {key}")
    if _DECIMAL.fullmatch(text) is None or not lo <= int(text) <= hi:
        raise PayloadError(f"{key} = {text[:40]!r} is not an integer in [{lo}, {hi}]")
    return int(text)


def identity(meta: Mapping[str, str], kinds: Iterable[str]) -> tuple[str, str, int]:
    """(kind, method, round) of a payload's metadata."""
    kind = meta.get(KIND_KEY)
    if kind is None:
        raise PayloadError(f"not an edgefed payload: metadata lacks {KIND_KEY}")
    if kind not in kinds:
        raise PayloadError(f"unknown payload kind {kind[:40]!r}")
    method = meta.get(METHOD_KEY, "")
    if _METHOD.fullmatch(method) is None:
        raise PayloadError(f"{METHOD_KEY} = {method[:40]!r} is not a method name")
    return kind, method, meta_int(meta, ROUND_KEY, 0, MAX_ROUND)


def check_randomness_version(meta: Mapping[str, str]) -> None:
    version = meta.get(RANDOMNESS_KEY)
    if version != str(randomness.VERSION):
        raise PayloadMismatch(
            f"{RANDOMNESS_KEY} is {version!r}; this build speaks version {randomness.VERSION}"
        )


def dump_shapes(shapes: Mapping[str, Iterable[int]]) -> str:
    return json.dumps({k: [int(d) for d in v] for k, v in shapes.items()}, separators=(",", ":"))


def load_shapes(meta: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    text = meta.get(SHAPES_KEY)
    if text is None:
        raise PayloadError(f"metadata lacks {SHAPES_KEY}")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise PayloadError(f"{SHAPES_KEY} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise PayloadError(f"{SHAPES_KEY} must map names to shapes")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in raw.items():
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or math.prod(shape) > MAX_NUMEL
        ):
            raise PayloadError(f"{SHAPES_KEY}: shape of {name!r} is not a valid tensor shape")
        shapes[name] = tuple(shape)
    return shapes


# --- tensors ----------------------------------------------------------------------------------


def describe_difference(what: str, got: Mapping[str, object], want: Mapping[str, object]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        return (
            f"{what} differ: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {extra[:3]} ({len(extra)})"
        )
    bad = next(k for k in want if got[k] != want[k])
    return f"{what} differ: {bad!r} is {got[bad]}, expected {want[bad]}"


def check_specs(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> None:
    """Exact name set; each tensor's dtype and shape (``None`` dimensions free)."""
    if set(tensors) != set(specs):
        raise PayloadMismatch(describe_difference("tensor names", tensors, specs))
    for name, spec in specs.items():
        t = tensors[name]
        if t.dtype != spec.dtype:
            raise PayloadMismatch(f"{name!r}: dtype {t.dtype}, expected {spec.dtype}")
        if t.dim() != len(spec.shape) or any(
            w is not None and w != g for g, w in zip(t.shape, spec.shape, strict=True)
        ):
            raise PayloadMismatch(f"{name!r}: shape {list(t.shape)}, expected {list(spec.shape)}")


def _all_finite(t: torch.Tensor) -> bool:
    """numpy, not torch: ``torch.isfinite`` is ~50x slower on the CPUs we measured."""
    flat = t.detach().to("cpu").reshape(-1)
    if t.dtype is torch.bfloat16:  # no numpy dtype: all-ones exponent means inf or NaN
        bits = flat.view(torch.int16).numpy()
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    return bool(np.isfinite(flat.numpy()).all())


def _dot(x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):  # NaN, infinity, overflow: not finite
        return float(np.dot(x, x))


def square_sums(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per float32 tensor, the sum of the squares of its values, computed in float32 (one dot
    product each: no temporary of a tensor's size). Tensors of other dtypes are left out.

    A sum is finite exactly when every value is finite and no square or partial sum overflows
    float32 (values beyond ~1.8e19 in magnitude): NaN and infinity propagate through squares
    and through sums of non-negative terms. Each sum is accurate to a relative
    ``n·2⁻²⁴/(1 − n·2⁻²⁴)`` for ``n`` values, whatever order the BLAS adds them in (all terms
    are non-negative; ``aggregator.methods.robust`` widens its bound by that).
    """
    out: dict[str, float] = {}
    for name, t in tensors.items():
        if t.dtype is torch.float32:
            out[name] = _dot(t.detach().to("cpu").reshape(-1).numpy()) if t.numel() else 0.0
    return out


Origins = Mapping[str, tuple[str, int | None]]
"""A decoded tensor's name -> the payload entry it is (None) or a slice of (its index)."""


def entry_square_sums(entries: Mapping[str, torch.Tensor], origins: Origins) -> dict[str, float]:
    """:func:`square_sums` of the tensors that ``origins`` builds from ``entries``, computed on
    the entries: one batched product per stacked entry (its layers at once) instead of one
    call per tensor."""
    stacked = {entry for entry, index in origins.values() if index is not None}
    rows: dict[str, Any] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for entry, t in entries.items():
            if t.dtype is not torch.float32:
                continue
            if entry in stacked and t.numel():
                x = t.detach().reshape(t.shape[0], -1).numpy()
                rows[entry] = np.matmul(x[:, None, :], x[:, :, None]).reshape(-1).tolist()
            else:
                rows[entry] = _dot(t.detach().reshape(-1).numpy()) if t.numel() else 0.0
    out: dict[str, float] = {}
    for name, (entry, index) in origins.items():
        row = rows.get(entry)
        if row is not None:
            out[name] = row if index is None else row[index]
    return out


def check_finite(
    tensors: Mapping[str, torch.Tensor], sums: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Raises :class:`NotFinite` naming the first floating tensor that holds NaN or infinity.

    Float32 tensors are checked by their sums of squares (``sums``, else :func:`square_sums`:
    a finite sum means every value is); a tensor whose sum is not finite (a NaN or infinity,
    or values so large that their squares overflow) and any other floating tensor is checked
    value by value. Returns the float32 tensors' sums of squares, for bounds that need norms
    (``Payload.square_sums``).
    """
    sums = dict(square_sums(tensors) if sums is None else sums)
    # each sum is at most ~3.4e38 (float32's largest): their float64 total is finite unless one is not
    if len(sums) == len(tensors) and math.isfinite(sum(sums.values())):
        return sums
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        s = sums.get(name)
        if s is not None and math.isfinite(s):
            continue
        if not _all_finite(t):
            raise NotFinite(f"{name!r} holds NaN or infinite values")
    return sums


def lora_rank_of(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Module prefix -> LoRA rank, checking that each A has as many rows as its B has columns.

    Names follow peft's ``get_peft_model_state_dict``: ``<module>.lora_A.weight`` ``[r, in]``
    with ``<module>.lora_B.weight`` ``[out, r]`` (or ``lora_embedding_A``/``_B``). Other
    names are ignored.
    """
    pairs: dict[str, list[torch.Size | None]] = {}
    for name, t in state.items():
        if ".lora_" not in name:
            continue
        for a_suffix, b_suffix in _LORA_SUFFIXES:
            side = 0 if name.endswith(a_suffix) else 1 if name.endswith(b_suffix) else -1
            if side >= 0:
                module = name[: -len(a_suffix if side == 0 else b_suffix)]
                pairs.setdefault(module, [None, None])[side] = t.shape
                break
    ranks: dict[str, int] = {}
    for module, (a, b) in pairs.items():
        if a is None or b is None:
            raise PayloadMismatch(f"{module}: lora_{'B' if a is None else 'A'} has no partner")
        if len(a) < 2 or len(b) < 2:
            raise PayloadMismatch(f"{module}: LoRA factors must have at least 2 dimensions")
        if a[0] != b[1] or a[0] < 1:
            raise PayloadMismatch(
                f"{module}: rank mismatch, lora_A has {a[0]} rows, lora_B has {b[1]} columns"
            )
        ranks[module] = int(a[0])
    return ranks


def _vector(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if t.dim() != 1:
        raise PayloadMismatch(f"{name!r} must be 1-D, has shape {list(t.shape)}")
    if dtypes is None and not t.is_floating_point():
        raise PayloadMismatch(f"{name!r} must hold floating values, has {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise PayloadMismatch(f"{name!r}: dtype {t.dtype}, expected one of {list(dtypes)}")


def check_masked(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    meta_int(meta, SEED_KEY, 0, 2**64 - 1)
    text = meta.get(DENSITY_KEY, "")
    try:
        density = float(text)
    except ValueError:
        density = math.nan
    if not 0.0 < density <= 1.0:
        raise PayloadError(f"{DENSITY_KEY} = {text[:40]!r} is not in (0, 1]")
    shapes = load_shapes(meta)
    if set(tensors) != set(shapes):
        raise PayloadMismatch(describe_difference("masked tensor names", tensors, shapes))
    for name, t in tensors.items():
        _vector(name, t)
        if t.numel() > math.prod(shapes[name]):
            raise PayloadMismatch(f"{name!r}: {t.numel()} values for {shapes[name]} elements")
    return shapes


def check_sparse(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    shapes = load_shapes(meta)
    want = {f"{n}.{part}": None for n in shapes for part in ("indices", "values")}
    if set(tensors) != set(want):
        raise PayloadMismatch(describe_difference("sparse tensor names", tensors, want))
    for name, shape in shapes.items():
        idx, val = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        _vector(f"{name}.indices", idx, _INDEX_DTYPES)
        _vector(f"{name}.values", val)
        if idx.numel() != val.numel():
            raise PayloadMismatch(f"{name!r}: {idx.numel()} indices but {val.numel()} values")
        if idx.numel() == 0:
            continue
        numel = math.prod(shape)
        if int(idx.min()) < 0 or int(idx.max()) >= numel:
            raise IndexOutOfRange(f"{name!r}: indices outside [0, {numel})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise IndexOutOfRange(f"{name!r}: indices are not strictly increasing (duplicates?)")
    return shapes


def check_seedcoef(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    meta_int(meta, BASE_SEED_KEY, 0, 2**64 - 1)
    k = meta_int(meta, K_KEY, 1, MAX_POOL)
    n_groups = meta_int(meta, N_GROUPS_KEY, 1, MAX_POOL)
    if set(tensors) != set(_SEEDCOEF_DTYPES):
        raise PayloadMismatch(
            describe_difference("seedcoef tensor names", tensors, _SEEDCOEF_DTYPES)
        )
    for name, dtype in _SEEDCOEF_DTYPES.items():
        _vector(name, tensors[name], (dtype,))
    group, seed = tensors["group"], tensors["seed"]
    if not group.numel() == seed.numel() == tensors["value"].numel():
        raise PayloadMismatch("group, seed and value have different lengths")
    if group.numel() == 0:
        return
    # numpy, not torch: a Ferret update's vectors are ~1,000 long, where torch's per-call
    # overhead was most of the check's time
    g, s = group.numpy(), seed.numpy()
    if int(s.min()) < 0 or int(s.max()) >= k:
        raise IndexOutOfRange(f"seed indices outside [0, {k})")
    if int(g.min()) < 0 or int(g.max()) >= n_groups:
        raise IndexOutOfRange(f"group indices outside [0, {n_groups})")
    pair = g.astype(np.int64) * k + s
    if bool((pair[1:] > pair[:-1]).all()):  # in order (as agents send them): each once
        return
    pair.sort()
    if bool((pair[1:] == pair[:-1]).any()):
        raise IndexOutOfRange("a (group, seed) pair occurs more than once")
