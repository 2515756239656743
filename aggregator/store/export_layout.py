"""Where a run's result is exported and what base it names: one layout for every export path.

``edgefed-aggregator export --out DIR``, ``serve`` with ``run.export_dir`` and ``local`` all call
:func:`export_result`, which writes into ``DIR/<kind>``, the kind saying what is there:

- ``adapter`` (FedIT, SLoRA, FedBiOT): a PEFT LoRA adapter directory;
- ``model`` (Ferret: the full fine-tuned model; FedPipe: the base with ΔW merged in): a
  standalone Hugging Face model directory.

Beside it, ``DIR/<kind>/edgefed-export.json`` records the provenance. ``adapter_config.json``
names a base that stock transformers can load (:func:`base_reference`): the base model directory
(``run.model_dir``: for the embedded model, the cached HF directory ``model prepare`` wrote),
else the Hugging Face hub id of a known alias, else the name as configured. The embedded
alias ``smollm2-135m`` is a Q4_1 GGUF of :data:`HUB_IDS` ``["smollm2-135m"]``; its weights are the
dequantized GGUF, so the hub id is recorded as provenance, the cached directory as the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aggregator.store.checkpoint import atomic_write_bytes

KINDS: dict[str, str] = {
    "fedit": "adapter",
    "slora": "adapter",
    "fedbiot": "adapter",
    "ferret": "model",
    "fedpipe": "model",
    "fedavg": "model",
}
"""What each method exports (the folder name under the export directory)."""

HUB_IDS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hugging Face hub ids of the model aliases edgefed knows (provenance of the embedded model)."""

PROVENANCE = "edgefed-export.json"


def base_reference(model: str, model_dir: Path | None) -> str:
    """What ``base_model_name_or_path`` says: a directory or hub id that loads, never an alias."""
    if model_dir is not None:
        return str(Path(model_dir).resolve())
    return HUB_IDS.get(model, model)


def export_result(
    method: Any,
    method_name: str,
    out: Path,
    *,
    model: str,
    model_dir: Path | None,
    round_: int | None = None,
) -> dict[str, Path]:
    """Write ``method``'s result into ``out/<kind>`` and its provenance; return what was written
    (the method's own keys, plus ``kind`` → the folder and ``provenance``)."""
    kind = KINDS.get(method_name, "adapter")
    target = Path(out) / kind
    base = base_reference(model, model_dir)
    written: dict[str, Path] = dict(method.export(target, base_model_name=base))
    info = {
        "method": method_name,
        "kind": kind,
        "round": round_,
        "base_model_name_or_path": base,
        "model": model,
        "hub_id": HUB_IDS.get(model),
    }
    provenance = target / PROVENANCE
    atomic_write_bytes(provenance, (json.dumps(info, indent=2) + "\n").encode())
    return written | {kind: target, "provenance": provenance}
