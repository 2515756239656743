"""FedBiOT's emulator on the wire: which layers it keeps, the bundle, the alignment state and
its deltas. Used by both halves, so that an agent's emulator is the server's bit for bit.

Layer plan. A base model with L decoder layers and k adapter layers has the bottom layers
``0..L-k-1``; the emulator keeps ``keep = max(1, round((L-k)·(1-drop_ratio)))`` of them (at least
2 when the bottom has 2 or more), at indices ``round(i·(L-k-1)/(keep-1))`` (halves rounded up) for
``i = 0..keep-1``: the first and the last bottom layer are always kept. The *small model* has
``E + k`` layers: small layer ``j < E`` is full layer ``emulator[j]``, small layer ``E + j`` is full
layer ``L - k + j``.

Bundle (payload kind ``dense``, method ``fedbiot``, round 0): the small model's weights under its
own names (``model.layers.<j>...``, embeddings, final norm, ``lm_head.weight`` unless tied), in
the bundle dtype. Metadata:

=========================  ==========================================================
``fedbiot.config``         JSON of the small model's ``config.json`` (``num_hidden_layers`` = E+k)
``fedbiot.layers``         JSON list: full layer index of every small layer
``fedbiot.adapter_layers`` k, decimal
``fedbiot.full_layers``    L, decimal
``fedbiot.base_sha256``    the base model's weights sha256 (``BaseModelRef.sha256``)
=========================  ==========================================================

Its sha256 (of the bytes) is the emulator id. Alignment state: LoRA factors on the emulator
layers' target linears, ``<module>.A`` ``[r, in]`` and ``<module>.B`` ``[out, r]`` float32, with
``<module>`` = ``model.layers.<j>.<path>`` (small names). Version 0 is the seeded start (A from
:func:`protocol.randomness.uniform` on ``stream_key(seed, "<module>.A")``, scaled to
±1/√in in float64 and rounded once to float32; B = 0). Version v+1 = version v + delta, added in
float32, where a delta is bfloat16; both sides add the same bf16 values to the same float32
tensors, so they agree exactly. The emulator weight of a target is
``float32(float64(W) + scaling · float64(B) @ float64(A))``.

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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protocol import payloads, randomness
from protocol.errors import PayloadError, PayloadMismatch

METHOD = "fedbiot"
CONFIG_KEY = "fedbiot.config"
LAYERS_KEY = "fedbiot.layers"
ADAPTER_KEY = "fedbiot.adapter_layers"
FULL_LAYERS_KEY = "fedbiot.full_layers"
BASE_KEY = "fedbiot.base_sha256"
ALIGN_KEY = "fedbiot.align"
VERSIONS_KEY = "fedbiot.versions"
SHAS_KEY = "fedbiot.shas"
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
DELTA_DTYPE = torch.bfloat16

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --- the layer plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatorPlan:
    full_layers: int
    adapter_layers: int
    emulator: tuple[int, ...]
    """Full-model indices of the kept bottom layers, increasing."""

    @property
    def n_emulator(self) -> int:
        return len(self.emulator)

    @property
    def adapter(self) -> tuple[int, ...]:
        return tuple(range(self.full_layers - self.adapter_layers, self.full_layers))

    @property
    def layer_map(self) -> tuple[int, ...]:
        """Full index of every small-model layer."""
        return self.emulator + self.adapter

    def adapter_to_full(self) -> dict[int, int]:
        return {self.n_emulator + j: full for j, full in enumerate(self.adapter)}

    def full_to_adapter(self) -> dict[int, int]:
        return {full: small for small, full in self.adapter_to_full().items()}


def plan_emulator(full_layers: int, adapter_layers: int, drop_ratio: float) -> EmulatorPlan:
    bottom = full_layers - adapter_layers
    if adapter_layers < 1 or bottom < 1:
        raise ValueError(
            f"{full_layers} decoder layers cannot give {adapter_layers} adapter layers and a "
            "non-empty bottom part"
        )
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    keep = max(1, round(bottom * (1.0 - drop_ratio)))
    if bottom >= 2:
        keep = max(keep, 2)
    if keep == 1:
        return EmulatorPlan(full_layers, adapter_layers, (0,))
    # round(i·(bottom-1)/(keep-1)) with halves up, in integers
    span, steps = bottom - 1, keep - 1
    kept = tuple((2 * i * span + steps) // (2 * steps) for i in range(keep))
    return EmulatorPlan(full_layers, adapter_layers, kept)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def renamed(name: str, mapping: Mapping[int, int]) -> str:
    """``name`` with its first ``layers.<i>.`` renumbered by ``mapping``."""
    m = _LAYER.search(name)
    if m is None or int(m.group(1)) not in mapping:
        raise PayloadMismatch(f"{name!r} is not in a mapped layer")
    return f"{name[: m.start(1)]}{mapping[int(m.group(1))]}{name[m.end(1) :]}"


def rename_layers(
    state: Mapping[str, torch.Tensor], mapping: Mapping[int, int]
) -> dict[str, torch.Tensor]:
    """``state`` with every name renumbered by :func:`renamed`."""
    return {renamed(name, mapping): value for name, value in state.items()}


def small_config(full_config: Mapping[str, Any], plan: EmulatorPlan) -> dict[str, Any]:
    """The small model's config.json: E+k layers (per-layer lists cut the same way)."""
    config = dict(full_config)
    if config.get("num_hidden_layers") != plan.full_layers:
        raise ValueError("the config's num_hidden_layers does not match the plan")
    config["num_hidden_layers"] = len(plan.layer_map)
    for key, value in full_config.items():
        if isinstance(value, list) and len(value) == plan.full_layers and key.startswith("layer"):
            config[key] = [value[i] for i in plan.layer_map]
    return config


def bundle_names(full_names: Iterable[str], plan: EmulatorPlan, *, tied: bool) -> dict[str, str]:
    """Small-model name → full-model name of every tensor the bundle holds."""
    small_of = {full: small for small, full in enumerate(plan.layer_map)}
    out: dict[str, str] = {}
    for name in full_names:
        layer = layer_of(name)
        if layer is None:
            if tied and name == "lm_head.weight":
                continue
            out[name] = name
        elif layer in small_of:
            out[renamed(name, small_of)] = name
    return dict(sorted(out.items()))


# --- the bundle ---------------------------------------------------------------------------------


@dataclass
class Bundle:
    config: dict[str, Any]
    plan: EmulatorPlan
    base_sha256: str
    tensors: dict[str, torch.Tensor]


def encode_bundle(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], plan: EmulatorPlan, base: str
) -> bytes:
    meta = {
        CONFIG_KEY: json.dumps(dict(config), sort_keys=True),
        LAYERS_KEY: json.dumps(list(plan.layer_map)),
        ADAPTER_KEY: str(plan.adapter_layers),
        FULL_LAYERS_KEY: str(plan.full_layers),
        BASE_KEY: base,
    }
    return payloads.encode_dense(tensors, method=METHOD, round=0, meta=meta)


def decode_bundle(data: payloads.Buffer) -> Bundle:
    """Parse and check a bundle: its layer map, config and tensor names agree."""
    p = payloads.decode(data, payloads.Expect(kind=payloads.PayloadKind.DENSE, method=METHOD))
    try:
        config = json.loads(p.meta[CONFIG_KEY])
        layer_map = json.loads(p.meta[LAYERS_KEY])
        k, full = int(p.meta[ADAPTER_KEY]), int(p.meta[FULL_LAYERS_KEY])
        base = p.meta[BASE_KEY]
    except (KeyError, ValueError) as exc:
        raise PayloadError(f"not an emulator bundle: {exc}") from None
    if not isinstance(config, dict) or not isinstance(layer_map, list):
        raise PayloadError("emulator bundle: config or layer map malformed")
    emulator = tuple(int(i) for i in layer_map[: len(layer_map) - k])
    plan = EmulatorPlan(full, k, emulator)
    if (
        k < 1
        or list(plan.layer_map) != layer_map
        or config.get("num_hidden_layers") != len(layer_map)
        or list(emulator) != sorted(set(emulator))
        or (emulator and (emulator[0] < 0 or emulator[-1] >= full - k))
    ):
        raise PayloadError("emulator bundle: layer map, adapter layers and config disagree")
    for name in p.tensors:
        layer = layer_of(name)
        if layer is not None and layer >= len(layer_map):
            raise PayloadMismatch(f"emulator bundle: {name!r} is beyond the small model's layers")
    return Bundle(config=config, plan=plan, base_sha256=base, tensors=p.tensors)


def param_count(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# --- the alignment state ------------------------------------------------------------------------


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


def build_small(bundle: Bundle, dtype: torch.dtype = torch.float32) -> Any:
    """The small model of a bundle on CPU in ``dtype``, every weight frozen: what agents train
    on and what the server aligns (both build it here, so both hold the same model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(bundle.config)
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(
        {n: t.to(dtype) for n, t in bundle.tensors.items()}, strict=False, assign=True
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if result.unexpected_keys or set(result.missing_keys) - ({"lm_head.weight"} if tied else set()):
        raise PayloadMismatch(f"emulator bundle does not fit its config: {result}")
    model.tie_weights()
    model.config.use_cache = False
    model.requires_grad_(False)
    return model
