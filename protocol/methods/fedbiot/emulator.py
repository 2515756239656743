"""FedBiOT's emulator on the wire: which layers it keeps and the bundle. Used by both halves, so
that an agent's emulator is the server's bit for bit.

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

Its sha256 (of the bytes) is the emulator id. The alignment state and its deltas:
:mod:`protocol.methods.fedbiot.state`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from protocol import payloads
from protocol.errors import PayloadError, PayloadMismatch

METHOD = "fedbiot"
CONFIG_KEY = "fedbiot.config"
LAYERS_KEY = "fedbiot.layers"
ADAPTER_KEY = "fedbiot.adapter_layers"
FULL_LAYERS_KEY = "fedbiot.full_layers"
BASE_KEY = "fedbiot.base_sha256"
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

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
