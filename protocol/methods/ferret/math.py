"""Ferret's shared math: parameter groups, seeded bases, projection and the global step.

Both halves import this module, so the agent and the aggregator run the *same* float
operations in the same order. The wire-level definitions (how a basis is derived from a seed,
what a coefficient means) are in :mod:`protocol.methods.ferret.spec`; this module implements them.

Bit-exactness. The global step of a group is ``Δ = Σ_s c_s · r_s`` over its (seed, coefficient)
terms in ascending seed order, with ``r_s`` a vector of ±1 signs and ``c_s`` a float32 scalar
computed in Python (IEEE float64, correctly rounded ``sqrt``) and rounded once to float32.
``c_s · (±1)`` is exact, so every element is a chain of float32 additions in a fixed order:
``acc = 0; acc += c_1 r_1; acc += c_2 r_2; ...; param += acc``. Additions are elementwise
(no reductions, no FMA ambiguity, no thread-count dependence), so any CPU or GPU gives the
same bits. Uniform or Gaussian bases would make the products inexact and hardware-dependent;
that is why the basis is Rademacher.

Speed. Signs come from the shared generator's 64-bit words, eight at a time: each byte of a
word indexes a 256 x 8 table of (±c) values, so one ``index_select`` turns ``n / 8`` bytes into
``n`` signed coefficients; with the accumulation, about 2e9 signs/s on one core of the
2-core dev box (``benchmarks/ferret_k.py``, 2026-12-03). Work is chunked (:data:`CHUNK` elements per temporary) and the bases are made
one seed at a time, chunk by chunk (never a K x d matrix), so memory stays a few MB whatever
the group size and K (measured: ``benchmarks/ferret_k.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import median

import numpy as np
import torch

from protocol import randomness

CHUNK = 1 << 20
"""Elements per temporary in projection and reconstruction (a multiple of 64)."""

_DIGITS = re.compile(r"([0-9]+)")


# --- parameter groups --------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One parameter tensor inside a group: its slice ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Group:
    index: int
    name: str
    """Stream name of the group's bases: ``<first member>#<member count>``."""
    members: tuple[Member, ...]

    @property
    def numel(self) -> int:
        last = self.members[-1]
        return last.offset + last.numel


@dataclass(frozen=True)
class Layout:
    """The parameter groups of a model, a pure function of its parameter names and shapes."""

    groups: tuple[Group, ...]

    @property
    def numel(self) -> int:
        return sum(g.numel for g in self.groups)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {m.name: m.shape for g in self.groups for m in g.members}

    def sha256(self) -> str:
        """Fingerprint both sides compare before exchanging coefficients."""
        rows = [[g.name, [[m.name, list(m.shape)] for m in g.members]] for g in self.groups]
        text = json.dumps(rows, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(p)) if p.isdecimal() else (1, p) for p in _DIGITS.split(name) if p]


def build_layout(shapes: Mapping[str, Sequence[int]]) -> Layout:
    """Group parameters as the reference does, over names in natural order.

    Walking the sorted names, a tensor joins the open group unless that would take the group
    past ``target = int(0.9 * median numel)``; then the group closes and the tensor opens the
    next. A matrix larger than the target is therefore alone, and small tensors (norms,
    biases) are packed together.
    """
    if not shapes:
        raise ValueError("a model with no parameters has no Ferret layout")
    names = sorted(shapes, key=natural_key)
    sizes = {n: math.prod(int(d) for d in shapes[n]) for n in names}
    target = int(0.9 * median(sizes.values()))
    packs: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for name in names:
        if current and filled + sizes[name] > target:
            packs.append(current)
            current, filled = [], 0
        current.append(name)
        filled += sizes[name]
    packs.append(current)
    groups = []
    for index, pack in enumerate(packs):
        members, offset = [], 0
        for name in pack:
            members.append(Member(name, tuple(int(d) for d in shapes[name]), offset))
            offset += sizes[name]
        groups.append(Group(index, f"{pack[0]}#{len(pack)}", tuple(members)))
    return Layout(tuple(groups))


# --- seeds and signs ---------------------------------------------------------------------------


def pool_base_seed(seed: int) -> int:
    """The base seed of the run's pool, ``key(seed, 0)``: one pool for the whole run, the same K
    bases every round (the paper's fixed shared random subspace). A fresh pool per round
    (``key(seed, r)``) was an option until the scoreboard measured it no better over 3 seeds
    (``docs/methods/ferret.md``)."""
    return randomness.derive_key(seed, 0)


def agent_seed(seed: int, round: int, agent_id: str, purpose: str) -> int:
    """A 63-bit seed for one agent's ``purpose`` in ``round`` of the run seeded ``seed``:
    ``stream_key(key(seed, round), "<purpose>|<agent id>") >> 1``. The same flags give the same
    seeds, whatever the task ids."""
    return randomness.stream_key(randomness.derive_key(seed, round), f"{purpose}|{agent_id}") >> 1


def basis_key(base_seed: int, seed_index: int, group_name: str) -> int:
    """Key of the basis of seed ``seed_index`` of the pool for the group ``group_name``."""
    return randomness.stream_key(randomness.derive_key(base_seed, seed_index), group_name)


def _unit_table(device: torch.device) -> torch.Tensor:
    """Row ``b`` holds the eight signs (bit 0 first) of the byte ``b``: ``1 - 2 * bit``."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (1 - 2 * bits).to(device=device, dtype=torch.float32)


def _byte_indices(key: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """Bytes (int64) of the words covering elements ``[start, start + n)``, ``start % 64 == 0``."""
    words = randomness.words_torch(key, (n + 63) // 64, start=start // 64, device=device)
    raw = words.view(torch.uint8)
    if sys.byteorder != "little" and device.type == "cpu":
        raw = raw.view(-1, 8).flip(1).reshape(-1)  # byte 0 must hold bits 0..7
    return raw.long()


def scaled_signs(
    key: int, start: int, n: int, table: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c * rademacher(key, i)`` for the ``n`` elements from ``start`` (a multiple of 64),
    ``table`` being the unit table times ``c``; ``out`` (at least ``ceil(n / 64) * 64``
    elements, contiguous) is reused when given."""
    idx = _byte_indices(key, start, n, table.device)
    if out is None:
        return torch.index_select(table, 0, idx).view(-1)[:n]
    rows = out[: idx.numel() * 8].view(-1, 8)
    torch.index_select(table, 0, idx, out=rows)
    return out[:n]


def signs(key: int, n: int, *, start: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """``rademacher(key, i)`` for ``i`` in ``[start, start + n)`` as float32 (tests, debugging)."""
    dev = torch.device(device)
    head = start % 64
    return scaled_signs(key, start - head, n + head, _unit_table(dev))[head:]


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for off in range(0, n, CHUNK):
        yield off, min(CHUNK, n - off)


# --- projection (agents) -----------------------------------------------------------------------


def seeds_per_group(norms: Sequence[float], k: int) -> list[int]:
    """``n_g = max(floor(K * |Δ_g| / max_h |Δ_h|), 2)``, capped at K (the reference's rule).

    As in the reference the maximum starts at 1e-8, so an all-zero update gets two seeds per
    group. Norms must be finite.
    """
    if any(not math.isfinite(x) or x < 0 for x in norms):
        raise ValueError("group norms must be finite and non-negative")
    top = max([1e-8, *norms])
    return [min(k, max(int(k * x / top), 2)) for x in norms]


def project(delta: torch.Tensor, key_of: Iterable[tuple[int, int]], n_chosen: int) -> list[float]:
    """Coefficients ``γ_s = (d / n) <Δ, v_s>`` with ``v_s = r_s / sqrt(d)``, for each
    ``(seed index, key)`` in ``key_of``; ``delta`` is the group's flat update (float32)."""
    d = delta.numel()
    unit = _unit_table(delta.device)
    buf = torch.empty((min(d, CHUNK) + 63) // 64 * 64, dtype=torch.float32, device=delta.device)
    scale = math.sqrt(d) / n_chosen
    out = []
    for _, key in key_of:
        total = 0.0
        for off, n in _chunks(d):
            part = scaled_signs(key, off, n, unit, buf)
            total += float(torch.dot(part, delta[off : off + n]))
        out.append(total * scale)
    return out


def choose_seeds(k: int, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` distinct seed indices of ``[0, k)``, ascending."""
    return sorted(int(i) for i in rng.choice(k, size=n, replace=False))


# --- the global step (both sides, bit-exact) ---------------------------------------------------


def step_coefficient(gamma: float, numel: int, server_lr: float, clip_norm: float) -> float:
    """The float32 value added per sign for the term ``γ · v``: ``server_lr · clip(γ) / sqrt(d)``.

    ``|v| = 1`` exactly (``v = r / sqrt(d)``), so the reference's per-term clip
    ``min(1, clip_norm / (|γ v| + 1e-8))`` is a clip of ``|γ|``. Plain IEEE float64 arithmetic,
    rounded once to float32: the same on every machine.
    """
    coef = clip_norm / (abs(gamma) + 1e-8)
    if coef < 1.0:
        gamma *= coef
    return float(np.float32(server_lr * gamma / math.sqrt(numel)))


def is_clipped(gamma: float, clip_norm: float) -> bool:
    return clip_norm / (abs(gamma) + 1e-8) < 1.0


@dataclass
class StepStats:
    terms: int = 0
    clipped: int = 0
    sq_norm: float = 0.0
    """Squared norm of the applied step (float64 sum of float32 chunks; reporting only)."""


def apply_step(
    params: Mapping[str, torch.Tensor],
    layout: Layout,
    base_seed: int,
    group: torch.Tensor,
    seed: torch.Tensor,
    value: torch.Tensor,
    *,
    server_lr: float,
    clip_norm: float,
    measure: bool = False,
) -> StepStats:
    """Add the global step of the triples ``(group, seed, value)`` to ``params`` in place.

    ``params`` maps each member name to its (contiguous) tensor, float32 or bfloat16; the step
    is accumulated in float32 and added once per element. Terms are applied group by group in
    ascending (group, seed) order whatever the order of the triples.
    """
    stats = StepStats()
    if group.numel() == 0:
        return stats
    g_list = group.tolist()
    s_list = seed.tolist()
    v_list = value.to(torch.float32).tolist()
    order = sorted(range(len(g_list)), key=lambda i: (g_list[i], s_list[i]))
    by_group: dict[int, list[tuple[int, float]]] = {}
    for i in order:
        by_group.setdefault(g_list[i], []).append((s_list[i], v_list[i]))
    with torch.no_grad():
        for g_index, terms in by_group.items():
            g = layout.groups[g_index]
            targets = [params[m.name].view(-1) for m in g.members]
            device = targets[0].device
            unit = _unit_table(device)
            table = torch.empty_like(unit)
            coefs = []  # (key, c): two numbers per term, so memory does not grow with K
            for s, gamma in terms:
                c = step_coefficient(gamma, g.numel, server_lr, clip_norm)
                stats.clipped += is_clipped(gamma, clip_norm)
                coefs.append((basis_key(base_seed, s, g.name), c))
            stats.terms += len(terms)
            size = min(g.numel, CHUNK)
            acc_buf = torch.empty(size, dtype=torch.float32, device=device)
            sign_buf = torch.empty((size + 63) // 64 * 64, dtype=torch.float32, device=device)
            for off, n in _chunks(g.numel):
                acc = acc_buf[:n].zero_()
                for key, c in coefs:
                    torch.mul(unit, c, out=table)  # ±c exactly
                    acc += scaled_signs(key, off, n, table, sign_buf)
                if measure:
                    stats.sq_norm += float(torch.dot(acc, acc))
                _add_span(g, targets, off, acc)
    return stats


def _add_span(g: Group, targets: Sequence[torch.Tensor], off: int, acc: torch.Tensor) -> None:
    """Add ``acc`` (the group's elements ``[off, off + len)``) into the member tensors."""
    end = off + acc.numel()
    for member, flat in zip(g.members, targets, strict=True):
        lo, hi = max(off, member.offset), min(end, member.offset + member.numel)
        if lo < hi:
            flat[lo - member.offset : hi - member.offset] += acc[lo - off : hi - off]
