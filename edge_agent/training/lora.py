"""LoRA adapters on the base model: attach, seeded initialisation, and the adapter state dict.

The adapter state dict (peft's ``get_peft_model_state_dict`` naming, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) is what travels.

Initialisation is reproduced bit for bit on every agent without torch's RNG: for each adapted
``nn.Linear`` with ``in_features`` inputs and rank ``r``, with ``name`` the state-dict key of
its ``lora_A`` tensor::

    u        = protocol.randomness.uniform(stream_key(init_seed, name), r * in_features)
    lora_A   = float32((2u - 1) / sqrt(in_features))  reshaped [r, in_features], row-major;
               computed in float64, rounded once to float32
    lora_B   = 0

``1/sqrt(in_features)`` is the bound of peft's kaiming-uniform init (``a = sqrt(5)``), so the
adapter has peft's distribution, and B = 0 means the adapted model starts equal to the base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from edge_agent.errors import ConfigError, ModelError
from protocol.lora_init import initial_a

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
"""Prefix of every key in peft's adapter state dict for a causal LM."""


@dataclass(frozen=True)
class LoraSpec:
    """Shape of a LoRA adapter; ``rank_pattern`` overrides ``r`` per module (peft's keys)."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    rank_pattern: Mapping[str, int] = field(default_factory=dict, hash=False)
    layers: tuple[int, ...] = ()
    """Decoder layer indices to adapt (peft's ``layers_to_transform`` over ``layers``); empty:
    every layer."""
    rslora: bool = False
    """Rank-stabilised scaling (peft's ``use_rslora``): ``alpha / sqrt(r)`` per module instead of
    ``alpha / r``."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(
            isinstance(m, str) and m for m in self.target_modules
        ):
            problems.append(f"target_modules must be non-empty names, got {self.target_modules!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                problems.append(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if not all(isinstance(i, int) and i >= 0 for i in self.layers):
            problems.append(f"layers must be non-negative integers, got {self.layers!r}")
        if problems:
            raise ConfigError("invalid LoRA spec: " + "; ".join(problems))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        object.__setattr__(self, "rank_pattern", MappingProxyType(dict(self.rank_pattern)))


def lora_config(spec: LoraSpec, base_model_name: str | None = None) -> LoraConfig:
    """The peft ``LoraConfig`` for ``spec`` (causal LM, no bias)."""
    from peft import LoraConfig, TaskType

    options: dict[str, Any] = {
        "r": spec.r,
        "lora_alpha": spec.alpha,  # peft annotates int but computes alpha / r in float
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.target_modules),
        "rank_pattern": dict(spec.rank_pattern),
        "bias": "none",
        "use_rslora": spec.rslora,
        "task_type": TaskType.CAUSAL_LM,
        "base_model_name_or_path": base_model_name,
    }
    if spec.layers:
        options.update(layers_to_transform=list(spec.layers), layers_pattern="layers")
    return LoraConfig(**options)


def adapter_config_dict(spec: LoraSpec, base_model_name: str) -> dict[str, Any]:
    """What peft writes to ``adapter_config.json`` for ``spec`` (plain JSON types)."""
    import json

    data = lora_config(spec, base_model_name).to_dict()
    for key, value in data.items():
        if isinstance(value, set):  # as peft's save_pretrained does, but in a stable order
            data[key] = sorted(value)
    result: dict[str, Any] = json.loads(json.dumps(data))  # enums -> their string values
    return result


# --- targets and initial values ---------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    prefix: str  # state-dict prefix of the adapted module, ending before ".lora_A"
    in_features: int
    out_features: int
    r: int


def _targets(model: torch.nn.Module, spec: LoraSpec) -> list[_Target]:
    """The modules ``spec`` adapts in ``model`` (a PeftModel, or a plain model to be adapted)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if layers:  # already adapted: the layers themselves are the truth
        prefix = "" if isinstance(model, PeftModel) else PEFT_PREFIX
        out = []
        for name, layer in layers:
            if "default" not in layer.lora_A:
                continue
            a: Any = layer.lora_A["default"]
            b: Any = layer.lora_B["default"]
            out.append(
                _Target(prefix + name, int(a.in_features), int(b.out_features), int(a.out_features))
            )
        return out
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = lora_config(spec)
    out = []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ModelError(f"LoRA target {name} is a {type(module).__name__}, not a Linear")
        key = get_pattern_key(list(spec.rank_pattern), name)
        r = spec.rank_pattern.get(key, spec.r)
        out.append(_Target(PEFT_PREFIX + name, module.in_features, module.out_features, r))
    return out


def init_lora_state(
    model_or_peft: torch.nn.Module, spec: LoraSpec, init_seed: int
) -> dict[str, torch.Tensor]:
    """The initial adapter (float32, CPU) that :func:`attach_lora` sets for ``init_seed``."""
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or not 0 <= init_seed < 2**64:
        raise ConfigError(f"LoRA init_seed must be an integer in [0, 2**64), got {init_seed!r}")
    targets = _targets(model_or_peft, spec)
    if not targets:
        raise ModelError(f"no module of the model matches LoRA targets {spec.target_modules}")
    state: dict[str, torch.Tensor] = {}
    for t in targets:
        a_name = f"{t.prefix}.lora_A.weight"
        state[a_name] = initial_a(a_name, t.r, t.in_features, init_seed)
        state[f"{t.prefix}.lora_B.weight"] = torch.zeros(t.out_features, t.r)
    return state


# --- attach and state -------------------------------------------------------------------------


def attach_lora(model: torch.nn.Module, spec: LoraSpec, *, init_seed: int) -> PeftModel:
    """Wrap ``model`` (modified in place) in a PeftModel with the seeded initial adapter.

    Only the adapter is trainable. torch's global RNG is left as it was.
    """
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ModelError("the model already carries a LoRA adapter")
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from torch's RNG
        try:
            peft_model = get_peft_model(model, lora_config(spec))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"cannot attach LoRA {spec}: {exc}") from None
    state = init_lora_state(peft_model, spec, init_seed)
    set_adapter_state(peft_model, state)
    logger.debug(
        "attached LoRA r=%d on %d modules (%d parameters)",
        spec.r,
        len(state) // 2,
        sum(t.numel() for t in state.values()),
    )
    return peft_model


def get_adapter_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter state dict: float32, CPU, contiguous, detached copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {
        k: v.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        for k, v in state.items()
    }


def set_adapter_state(peft_model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the adapter, refusing unknown or missing keys and wrong shapes."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(peft_model)
    unexpected = sorted(set(state) - set(current))
    missing = sorted(k for k in set(current) - set(state) if ".lora_" in k)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    for key in sorted(set(state) & set(current)):
        got, want = tuple(state[key].shape), tuple(current[key].shape)
        if got != want:
            problems.append(f"{key} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise ModelError("adapter state does not fit the model: " + "; ".join(problems[:5]))
    result: Any = set_peft_model_state_dict(peft_model, dict(state))
    if result.unexpected_keys:  # cannot happen after the checks above; never ignore it
        raise ModelError(f"adapter keys not loaded: {_some(sorted(result.unexpected_keys))}")


def _some(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
