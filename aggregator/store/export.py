"""Export of the global result: a PEFT adapter directory, and optionally a merged model.

The adapter directory is what ``peft.PeftModel.from_pretrained(base, dir)`` loads: an
``adapter_config.json`` and ``adapter_model.safetensors`` with peft's state-dict names. It is
written without importing peft, so the aggregator needs no model libraries for this.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aggregator.errors import StateError
from aggregator.store.checkpoint import atomic_write_bytes, fsync_dir, write_error
from protocol.methods._common import LoraParams

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def adapter_config(
    lora: LoraParams, *, base_model_name: str, layers: Sequence[int] = ()
) -> dict[str, object]:
    """peft's ``adapter_config.json`` for ``lora``; ``layers``: the decoder layers it adapts
    (peft's ``layers_to_transform``; empty: every layer)."""
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": lora.r,
        "lora_alpha": lora.peft_alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "rank_pattern": dict(lora.rank_pattern),
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": lora.peft_rslora,
        "use_dora": False,
        "modules_to_save": None,
    }
    if layers:
        config.update(layers_to_transform=sorted(set(layers)), layers_pattern="layers")
    return config


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as the safetensors file ``path``, whole or not at all: written beside it,
    synced, then renamed into place (a crash or a full disk never leaves a half file under the
    final name). A failed write is a :class:`StateError` naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(f"cannot write {path}", e) from e
    except SafetensorError as e:  # safetensors raises its own error for I/O failures (ENOSPC)
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write {path}: {e}") from e


def write_peft_adapter(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    lora: LoraParams,
    *,
    base_model_name: str,
    layers: Sequence[int] = (),
) -> dict[str, Path]:
    """``state`` as a peft adapter directory; ``layers``: the decoder layers it covers, when not
    every layer (written as ``layers_to_transform``, so peft attaches LoRA there only)."""
    if not state:
        raise StateError("there is no global adapter to export yet (no round has completed)")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / ADAPTER_WEIGHTS
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_safetensors(tensors, weights)
    config = out_dir / ADAPTER_CONFIG
    body = json.dumps(
        adapter_config(lora, base_model_name=base_model_name, layers=layers), indent=2
    )
    atomic_write_bytes(config, body.encode())
    return {"adapter": out_dir, "weights": weights, "config": config}


def _lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in state.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        b = state.get(module + ".lora_B.weight")
        if b is None:
            raise StateError(f"adapter has {name} but no matching lora_B")
        base_name = module.removeprefix(_PREFIX) + ".weight"
        pairs[base_name] = (a, b)
    return pairs


def merge_into_base(
    base_dir: Path, out_dir: Path, state: Mapping[str, torch.Tensor], lora: LoraParams
) -> Path:
    """Write ``base + scaling·B·A`` as a standalone model directory (no inference overhead)."""
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise StateError(f"{base_dir} holds no safetensors weights to merge into")
    pairs = _lora_pairs(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_names: set[str] = set()
    for file in files:
        weights = load_file(str(file))
        for name, (a, b) in pairs.items():
            if name in weights:
                scaling = lora.module_scaling(a.shape[0])  # peft's, at this module's rank
                w = weights[name]
                delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
                weights[name] = (w.to(torch.float32) + delta).to(w.dtype)
                merged_names.add(name)
        save_safetensors(weights, out_dir / file.name)
    missing = set(pairs) - merged_names
    if missing:
        raise StateError(f"base model has no weights for {sorted(missing)[:3]}")
    for extra in base_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and not extra.name.startswith("."):
            shutil.copy2(extra, out_dir / extra.name)
    return out_dir
