"""Shared randomness, version 1: a counter-based generator both sides regenerate from a seed.

The scheme is specified in ``spec/randomness.md`` (reference values in
``spec/randomness-v1.json``). Everything here is plain 64-bit integer arithmetic, so numpy on
any CPU and torch on CPU or CUDA give the same bits::

    mix64(z)            splitmix64 finaliser
    fnv1a64(name)       64-bit FNV-1a over the UTF-8 bytes of ``name``
    key(seed, stream)   = mix64(seed ^ mix64(stream))
    word(key, j)        = mix64(key + (j + 1) * 0x9E3779B97F4A7C15)
    uniform(key, i)     = (word(key, i) >> 11) * 2^-53
    rademacher(key, i)  = -1 if bit (i % 64) of word(key, i // 64) is set else +1
    mask(key, n, p)     = {i < n : uniform(key, i) < p}

numpy works on ``uint64`` (array arithmetic wraps modulo 2^64 without warnings). torch has no
general unsigned 64-bit arithmetic, so the torch versions use ``int64``: two's-complement
addition and multiplication wrap identically, and logical right shifts are arithmetic shifts
followed by a mask. Long draws are processed in chunks so temporary memory stays bounded.

The mask test ``uniform < p`` is done exactly in integers: with ``m = word >> 11`` and
``T = ceil(p * 2^53)`` (``p * 2^53`` is exact in float64), ``m * 2^-53 < p`` iff ``m < T`` iff
``word < T * 2^11``.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterator

import numpy as np
import torch
from numpy.typing import DTypeLike

from protocol.errors import ProtocolError

VERSION = 1
"""Version of the scheme implemented here; travels on the wire as ``randomness: 1``."""

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3

_CHUNK = 1 << 16
"""Values computed per chunk by the numpy versions (512 KiB of uint64: stays in cache)."""

_TORCH_CHUNK = 1 << 18
"""Values per chunk by the torch versions on CPU (2 MiB of int64 per temporary)."""

_TORCH_CHUNK_ACCEL = 1 << 22
"""Values per chunk on an accelerator, where fewer, larger kernels pay (32 MiB per temporary)."""


class RandomnessError(ProtocolError, ValueError):
    """An argument to the shared-randomness generator is out of range."""


# --- validation -------------------------------------------------------------------------------


def _u64(value: int, what: str) -> int:
    if isinstance(value, bool):
        raise RandomnessError(f"{what} must be an integer, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise RandomnessError(f"{what} must be an integer, got {type(value).__name__}") from None
    if not 0 <= v <= _M64:
        raise RandomnessError(f"{what} must be in [0, 2**64), got {v}")
    return v


def _count(n: int, start: int) -> tuple[int, int]:
    n = _u64(n, "n")
    start = _u64(start, "start")
    if start + n > 1 << 64:
        raise RandomnessError(f"start + n must be at most 2**64, got {start + n}")
    return n, start


def _threshold(density: float) -> int | None:
    """``T * 2^11`` with ``T = ceil(density * 2^53)``; ``None`` means every element (p = 1).

    ``density`` is taken as a float64: callers should carry it as one (a float32 0.01 is a
    different threshold from the float64 0.01).
    """
    if isinstance(density, bool):
        raise RandomnessError("density must be a number, not bool")
    try:
        p = float(density)
    except (TypeError, ValueError):
        raise RandomnessError(f"density must be a number, got {density!r}") from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise RandomnessError(f"density must be in [0, 1], got {density!r}")
    t = math.ceil(p * 2.0**53) << 11
    return None if t > _M64 else t


# --- scalar definitions -----------------------------------------------------------------------


def mix64(z: int) -> int:
    """The splitmix64 finaliser of ``z`` (an integer in [0, 2^64))."""
    z = _u64(z, "z")
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def fnv1a64(name: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes of ``name`` (the stream of a named tensor)."""
    if not isinstance(name, str):
        raise RandomnessError(f"name must be a str, got {type(name).__name__}")
    h = _FNV_OFFSET
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _M64
    return h


def derive_key(seed: int, stream: int) -> int:
    """``key(seed, stream) = mix64(seed ^ mix64(stream))``."""
    seed = _u64(seed, "seed")
    stream = _u64(stream, "stream")
    return mix64(seed ^ mix64(stream))


def stream_key(seed: int, name: str) -> int:
    """The key of the tensor (or Ferret group) ``name`` under ``seed``."""
    return derive_key(seed, fnv1a64(name))


def _base(key: int, start: int) -> int:
    """``key + (start + 1) * GOLDEN`` modulo 2^64: the pre-mix value of word ``start``."""
    return (key + (start + 1) * _GOLDEN) & _M64


# --- numpy ------------------------------------------------------------------------------------


def _mix64_np(z: np.ndarray, t: np.ndarray) -> None:
    """mix64 of ``z`` in place (uint64), with ``t`` a scratch array of the same size."""
    np.right_shift(z, np.uint64(30), out=t)
    z ^= t
    z *= np.uint64(_C1)
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= np.uint64(_C2)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t


def _word_chunks(key: int, n: int, start: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, words)`` for words ``start .. start + n - 1``, at most ``chunk`` at a time.

    Arguments are validated already. The yielded array is a view of a buffer that the next
    chunk overwrites: the caller may modify it but must copy what it keeps.
    """
    size = min(n, chunk)
    steps = np.arange(size, dtype=np.uint64)
    steps *= np.uint64(_GOLDEN)
    z = np.empty(size, dtype=np.uint64)
    t = np.empty(size, dtype=np.uint64)
    for off in range(0, n, max(size, 1)):
        m = min(size, n - off)
        zc, tc = z[:m], t[:m]
        np.add(steps[:m], np.uint64(_base(key, start + off)), out=zc)
        _mix64_np(zc, tc)
        yield off, zc


def words(key: int, n: int, start: int = 0) -> np.ndarray:
    """``word(key, start), ..., word(key, start + n - 1)`` as uint64."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    out = np.empty(n, dtype=np.uint64)
    for off, w in _word_chunks(key, n, start, _CHUNK):
        out[off : off + w.size] = w
    return out


def uniform(key: int, n: int, start: int = 0) -> np.ndarray:
    """Uniforms ``start .. start + n - 1`` in [0, 1) as float64 (53 random bits each)."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    out = np.empty(n, dtype=np.float64)
    for off, w in _word_chunks(key, n, start, _CHUNK):
        w >>= np.uint64(11)
        np.multiply(w, 2.0**-53, out=out[off : off + w.size])
    return out


def rademacher(key: int, n: int, start: int = 0, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Signs ``start .. start + n - 1`` (±1) as ``dtype``: sign i is bit i%64 of word i//64."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    out = np.empty(n, dtype=dtype)
    if n == 0:
        return out
    if out.dtype.kind not in "fi":
        raise RandomnessError(f"dtype must be a float or signed integer type, got {out.dtype}")
    table = np.array([1, -1], dtype=out.dtype)
    first = start // 64
    n_words = (start + n - 1) // 64 - first + 1
    skip = start - 64 * first  # signs of the first word before `start`
    for off, w in _word_chunks(key, n_words, first, max(1, _CHUNK // 64)):
        little = w if sys.byteorder == "little" else w.byteswap()
        bits = np.unpackbits(little.view(np.uint8), bitorder="little")
        lo = 64 * off - skip  # position in `out` of this chunk's first bit
        a, b = max(0, -lo), min(bits.size, n - lo)
        np.take(table, bits[a:b], out=out[lo + a : lo + b])
    return out


def _mask_args(key: int, n: int, density: float) -> tuple[int, int, int | None]:
    return _u64(key, "key"), _count(n, 0)[0], _threshold(density)


def _mask_chunks(key: int, n: int, threshold: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, fresh bool mask)`` per chunk of the first ``n`` elements."""
    t = np.uint64(threshold)
    for off, w in _word_chunks(key, n, 0, _CHUNK):
        yield off, w < t


def mask_bool(key: int, n: int, density: float) -> np.ndarray:
    """``uniform(key, i) < density`` for ``i < n`` as a bool array."""
    key, n, threshold = _mask_args(key, n, density)
    if threshold is None:
        return np.ones(n, dtype=bool)
    out = np.empty(n, dtype=bool)
    for off, m in _mask_chunks(key, n, threshold):
        out[off : off + m.size] = m
    return out


def mask_indices(key: int, n: int, density: float) -> np.ndarray:
    """The indices ``i < n`` with ``uniform(key, i) < density``, ascending, as int64."""
    key, n, threshold = _mask_args(key, n, density)
    if threshold is None:
        return np.arange(n, dtype=np.int64)
    parts = [np.flatnonzero(m).astype(np.int64) + off for off, m in _mask_chunks(key, n, threshold)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def mask_count(key: int, n: int, density: float) -> int:
    """How many of the first ``n`` elements the mask selects."""
    key, n, threshold = _mask_args(key, n, density)
    if threshold is None:
        return n
    return sum(int(np.count_nonzero(m)) for _, m in _mask_chunks(key, n, threshold))


# --- torch ------------------------------------------------------------------------------------


def _signed(u: int) -> int:
    """The int64 with the same bits as the uint64 ``u``."""
    return u - (1 << 64) if u >= 1 << 63 else u


_C1_S = _signed(_C1)
_C2_S = _signed(_C2)
_GOLDEN_S = _signed(_GOLDEN)
_SIGN_BIT_S = -(1 << 63)


def _mix64_torch(z: torch.Tensor, t: torch.Tensor) -> None:
    """mix64 of the int64 ``z`` in place; logical shifts are arithmetic shifts then a mask."""
    torch.bitwise_right_shift(z, 30, out=t)
    t &= (1 << 34) - 1
    z ^= t
    z *= _C1_S
    torch.bitwise_right_shift(z, 27, out=t)
    t &= (1 << 37) - 1
    z ^= t
    z *= _C2_S
    torch.bitwise_right_shift(z, 31, out=t)
    t &= (1 << 33) - 1
    z ^= t


def _torch_chunk(device: torch.device) -> int:
    return _TORCH_CHUNK if device.type == "cpu" else _TORCH_CHUNK_ACCEL


def _word_chunks_torch(
    key: int, n: int, start: int, chunk: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Like :func:`_word_chunks`, as int64 tensors holding the bits of the uint64 words."""
    size = min(n, chunk)
    steps = torch.arange(size, dtype=torch.int64, device=device)
    steps *= _GOLDEN_S
    z = torch.empty(size, dtype=torch.int64, device=device)
    t = torch.empty(size, dtype=torch.int64, device=device)
    for off in range(0, n, max(size, 1)):
        m = min(size, n - off)
        zc, tc = z[:m], t[:m]
        torch.add(steps[:m], _signed(_base(key, start + off)), out=zc)
        _mix64_torch(zc, tc)
        yield off, zc


def words_torch(
    key: int, n: int, *, start: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """:func:`words` as an int64 tensor on ``device`` holding the same 64 bits per word."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    dev = torch.device(device)
    out = torch.empty(n, dtype=torch.int64, device=dev)
    for off, w in _word_chunks_torch(key, n, start, _torch_chunk(dev), dev):
        out[off : off + w.numel()] = w
    return out


def uniform_torch(
    key: int, n: int, *, start: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """:func:`uniform` as a float64 tensor on ``device``; bit-identical on CPU and CUDA."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    dev = torch.device(device)
    out = torch.empty(n, dtype=torch.float64, device=dev)
    for off, w in _word_chunks_torch(key, n, start, _torch_chunk(dev), dev):
        w >>= 11
        w &= (1 << 53) - 1
        dst = out[off : off + w.numel()]
        dst.copy_(w)  # exact: values are below 2^53
        dst *= 2.0**-53
    return out


def rademacher_torch(
    key: int,
    n: int,
    *,
    start: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`rademacher` as a tensor of ``dtype`` on ``device``."""
    key = _u64(key, "key")
    n, start = _count(n, start)
    if not dtype.is_signed or dtype.is_complex:
        raise RandomnessError(f"dtype must be a float or signed integer type, got {dtype}")
    dev = torch.device(device)
    out = torch.empty(n, dtype=dtype, device=dev)
    if n == 0:
        return out
    shifts = torch.arange(64, dtype=torch.int64, device=dev)
    first = start // 64
    n_words = (start + n - 1) // 64 - first + 1
    skip = start - 64 * first
    for off, w in _word_chunks_torch(key, n_words, first, max(1, _torch_chunk(dev) // 64), dev):
        bits = (w.unsqueeze(1) >> shifts).reshape(-1)  # bit 63 keeps the sign: & 1 below
        lo = 64 * off - skip
        a, b = max(0, -lo), min(bits.numel(), n - lo)
        dst = out[lo + a : lo + b]
        dst.copy_(bits[a:b] & 1)
        dst *= -2
        dst += 1
    return out


def mask_indices_torch(
    key: int, n: int, density: float, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """:func:`mask_indices` as an int64 tensor on ``device``, ascending."""
    key, n, threshold = _mask_args(key, n, density)
    dev = torch.device(device)
    if threshold is None:
        return torch.arange(n, dtype=torch.int64, device=dev)
    # Unsigned a < b is signed (a ^ 2^63) < (b ^ 2^63) on the same bits.
    flipped = _signed(threshold ^ (1 << 63))
    parts = []
    for off, w in _word_chunks_torch(key, n, 0, _torch_chunk(dev), dev):
        w ^= _SIGN_BIT_S
        parts.append(torch.nonzero(w < flipped).squeeze(1) + off)
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    return torch.cat(parts)
