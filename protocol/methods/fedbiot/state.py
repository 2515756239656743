"""FedBiOT's alignment state on the wire: the state, its versions and deltas, and how a receiver
reaches the version a task names. Used by both halves (and a regional tier), so that every
holder of version v holds the same bits.

Alignment state: LoRA factors on the emulator layers' target linears, ``<module>.A`` ``[r, in]``
and ``<module>.B`` ``[out, r]`` float32, with ``<module>`` = ``model.layers.<j>.<path>`` (small
names). Version 0 is the seeded start (A from :func:`protocol.randomness.uniform` on
``stream_key(seed, "<module>.A")``, scaled to ±1/√in in float64 and rounded once to float32;
B = 0). Version v+1 = version v + delta, added in float32, where a delta is bfloat16; both sides
add the same bf16 values to the same float32 tensors, so they agree exactly. The emulator
weight of a target is ``float32(float64(W) + scaling · float64(B) @ float64(A))``.

A state travels as :func:`state_bytes` (``dense``, round = version, metadata ``fedbiot.align`` =
``state``); the sha256 of those bytes names the version. Deltas travel as one ``dense`` payload
(round = target version) with ``fedbiot.align`` = ``deltas``, ``fedbiot.versions`` = JSON
``[b, b+1, .., t]``, ``fedbiot.shas`` = JSON list of the state sha256 of each of those versions,
and tensors ``d<v>.<module>.A`` / ``.B`` for ``v = b+1..t``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol import payloads, randomness
from protocol.errors import PayloadError, PayloadMismatch, ProtocolError
from protocol.methods.fedbiot.emulator import METHOD, layer_of

ALIGN_KEY = "fedbiot.align"
VERSIONS_KEY = "fedbiot.versions"
SHAS_KEY = "fedbiot.shas"
DELTA_DTYPE = torch.bfloat16


# --- the state ------------------------------------------------------------------------


def align_targets(
    shapes: Mapping[str, tuple[int, ...]], n_emulator: int, target_modules: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """``model.layers.<j>.<path>`` → (out, in) of every 2-D target weight of emulator layers."""
    targets = tuple(target_modules)
    out: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        layer = layer_of(name)
        if layer is None or layer >= n_emulator or not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in targets):
            out[module] = (int(shape[0]), int(shape[1]))
    if not out:
        raise ValueError(f"no emulator linear matches the alignment targets {list(targets)}")
    return dict(sorted(out.items(), key=lambda kv: (layer_of(kv[0]), kv[0])))


def state_specs(targets: Mapping[str, tuple[int, int]], r: int) -> dict[str, tuple[int, int]]:
    specs: dict[str, tuple[int, int]] = {}
    for module, (out_f, in_f) in targets.items():
        specs[f"{module}.A"] = (r, in_f)
        specs[f"{module}.B"] = (out_f, r)
    return specs


def init_state(
    targets: Mapping[str, tuple[int, int]], r: int, seed: int
) -> dict[str, torch.Tensor]:
    """Version 0: seeded A (±1/√in), zero B; the same on every machine."""
    state: dict[str, torch.Tensor] = {}
    for module, (out_f, in_f) in targets.items():
        name = f"{module}.A"
        u = randomness.uniform(randomness.stream_key(seed, name), r * in_f)
        a = ((2.0 * u - 1.0) / math.sqrt(in_f)).astype(np.float32).reshape(r, in_f)
        state[name] = torch.from_numpy(a)
        state[f"{module}.B"] = torch.zeros(out_f, r)
    return state


def state_bytes(state: Mapping[str, torch.Tensor], version: int) -> bytes:
    return payloads.encode_dense(state, method=METHOD, round=version, meta={ALIGN_KEY: "state"})


def state_sha(state: Mapping[str, torch.Tensor], version: int) -> str:
    return hashlib.sha256(state_bytes(state, version)).hexdigest()


def make_delta(
    trained: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {n: (trained[n].float() - state[n]).to(DELTA_DTYPE) for n in state}


def apply_delta(
    state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if set(delta) != set(state):
        raise PayloadMismatch("the alignment delta names other tensors than the state")
    return {n: state[n] + delta[n].to(torch.float32) for n in state}


def merged_weights(
    base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """The emulator's aligned target weights (float32): ``W + scaling·B@A`` in float64."""
    out: dict[str, torch.Tensor] = {}
    for name in state:
        if not name.endswith(".A"):
            continue
        module = name[:-2]
        w = base[f"{module}.weight"].double()
        ba = state[f"{module}.B"].double() @ state[name].double()
        out[f"{module}.weight"] = (w + scaling * ba).to(torch.float32)
    return out


# --- the alignment blob -------------------------------------------------------------------------


@dataclass
class AlignBlob:
    kind: str
    """``state`` or ``deltas``."""
    versions: list[int]
    shas: list[str] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def encode_deltas(
    deltas: Mapping[int, Mapping[str, torch.Tensor]], base: int, shas: list[str]
) -> bytes:
    """Deltas of versions ``base+1..`` with the state sha256 of versions ``base..``."""
    versions = list(range(base, base + len(deltas) + 1))
    if sorted(deltas) != versions[1:] or len(shas) != len(versions):
        raise PayloadError("deltas must be consecutive, with one sha per version")
    tensors = {f"d{v}.{n}": t.to(DELTA_DTYPE) for v in versions[1:] for n, t in deltas[v].items()}
    meta = {ALIGN_KEY: "deltas", VERSIONS_KEY: json.dumps(versions), SHAS_KEY: json.dumps(shas)}
    return payloads.encode_dense(tensors, method=METHOD, round=versions[-1], meta=meta)


def decode_align(data: payloads.Buffer, specs: Mapping[str, tuple[int, ...]]) -> AlignBlob:
    """Parse an ``align`` blob and check its tensors against the state's names and shapes."""
    p = payloads.decode(data, payloads.Expect(kind=payloads.PayloadKind.DENSE, method=METHOD))
    kind = p.meta.get(ALIGN_KEY)
    if kind == "state":
        want = {n: payloads.TensorSpec(shape=s, dtype=torch.float32) for n, s in specs.items()}
        _check(p.tensors, want)
        return AlignBlob("state", [p.round], state=p.tensors)
    if kind != "deltas":
        raise PayloadError(f"not an alignment blob ({ALIGN_KEY} = {kind!r})")
    try:
        versions = [int(v) for v in json.loads(p.meta[VERSIONS_KEY])]
        shas = [str(s) for s in json.loads(p.meta[SHAS_KEY])]
    except (KeyError, ValueError, TypeError) as exc:
        raise PayloadError(f"alignment deltas: bad metadata ({exc})") from None
    if (
        len(versions) < 2
        or versions != list(range(versions[0], versions[0] + len(versions)))
        or len(shas) != len(versions)
        or versions[-1] != p.round
    ):
        raise PayloadError("alignment deltas: versions and shas do not form a chain")
    want = {
        f"d{v}.{n}": payloads.TensorSpec(shape=s, dtype=DELTA_DTYPE)
        for v in versions[1:]
        for n, s in specs.items()
    }
    _check(p.tensors, want)
    deltas = {v: {n: p.tensors[f"d{v}.{n}"] for n in specs} for v in versions[1:]}
    return AlignBlob("deltas", versions, shas=shas, deltas=deltas)


def _check(tensors: Mapping[str, torch.Tensor], want: Mapping[str, payloads.TensorSpec]) -> None:
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise PayloadMismatch(f"alignment blob: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in want.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise PayloadMismatch(f"alignment blob: {name} is {t.dtype} {list(t.shape)}")


def advance(
    current: tuple[int, dict[str, torch.Tensor]] | None,
    blob: AlignBlob,
    held: Callable[[str], dict[str, torch.Tensor] | None],
    init: Callable[[], dict[str, torch.Tensor]],
) -> tuple[int, dict[str, torch.Tensor]]:
    """The state a receiver reaches with ``blob``: (version, state).

    ``current`` is what it has in memory (version, state); ``held(sha)`` gives a stored state by
    its sha256 (or None, unchecked: the final sha256 is checked); ``init()`` the seeded version 0. A whole state replaces anything; deltas
    apply from the newest chain version the receiver has (its own, one it stores, or 0).
    """
    if blob.kind == "state":
        return blob.versions[0], dict(blob.state)
    start: tuple[int, dict[str, torch.Tensor]] | None = None
    for version, sha in reversed(list(zip(blob.versions, blob.shas, strict=True))):
        if current is not None and current[0] == version and state_sha(current[1], version) == sha:
            start = current
            break
        stored = held(sha)
        if stored is not None:
            start = (version, stored)
            break
    if start is None and blob.versions[0] == 0:
        start = (0, init())
    if start is None:
        raise PayloadMismatch(
            f"alignment deltas start at version {blob.versions[0]}, and no state of versions "
            f"{blob.versions[0]}..{blob.versions[-1]} is held here"
        )
    version, state = start
    for v in range(version + 1, blob.versions[-1] + 1):
        state = apply_delta(state, blob.deltas[v])
    if state_sha(state, blob.versions[-1]) != blob.shas[-1]:
        raise PayloadMismatch(f"alignment state of version {blob.versions[-1]} has another sha256")
    return blob.versions[-1], state


class NotHeld(Exception):
    """The task's alignment state was neither sent nor is it held here."""


def reach(
    version: int,
    sha: str,
    raw: payloads.Buffer | None,
    targets: Mapping[str, tuple[int, int]],
    align: tuple[int, int],
    current: tuple[int, dict[str, torch.Tensor]] | None,
    stored: Callable[[str], payloads.Buffer | None],
) -> tuple[int, dict[str, torch.Tensor], AlignBlob | None]:
    """The alignment state a receiver (an agent, a region) reaches for a task naming ``version``
    and its ``sha``: from the task's ``align`` blob ``raw`` (applied to ``current``, a stored
    state or the seeded version 0), else a stored whole state, else version 0 itself.

    ``align`` is ``(r, seed)`` of the alignment LoRA; ``stored(sha)`` gives an object's bytes or
    None. Returns ``(version, state, the decoded blob or None)``; the caller checks the final
    sha256. Raises :class:`NotHeld`, or a ``ProtocolError`` for a malformed or broken blob.
    """
    r, seed = align
    specs = state_specs(targets, r)

    def held(want: str) -> dict[str, torch.Tensor] | None:
        data = stored(want)
        if data is None:
            return None
        try:
            blob = decode_align(data, specs)
        except ProtocolError:
            return None
        return blob.state if blob.kind == "state" else None

    def init() -> dict[str, torch.Tensor]:
        return init_state(targets, r, seed)

    if raw is not None:
        blob = decode_align(raw, specs)
        reached, state = advance(current, blob, held, init)
        return reached, state, blob
    kept = held(sha)
    if kept is None and version != 0:
        raise NotHeld(f"alignment version {version} was not sent and is not held here")
    return version, kept if kept is not None else init(), None
