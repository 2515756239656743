"""A full fine-tuned model as an HF directory: the base's config and tokenizer files beside
the new weights (methods that train every weight: fedavg; Ferret writes the same layout)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.store.checkpoint import atomic_write_bytes
from aggregator.store.export import save_safetensors

_NOT_COPIED = (".safetensors", ".safetensors.index.json", ".bin", ".gguf", ".pt", ".pth")
"""The base's weights are not copied; ``edgefed-model.json`` (the model store's marker) neither."""
_MARKER = "edgefed-model.json"


def write_full_model(
    model_dir: Path, weights: Mapping[str, torch.Tensor], out_dir: Path, info: dict[str, Any]
) -> dict[str, Path]:
    """Copy ``model_dir``'s non-weight files into ``out_dir``, write ``weights`` as
    ``model.safetensors`` and ``info`` as ``<method>.json``; what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(model_dir).iterdir()):
        skip = f.name == _MARKER or f.name.startswith(".") or f.name.endswith(_NOT_COPIED)
        if f.is_file() and not skip:
            shutil.copy2(f, out_dir / f.name)
    path = out_dir / "model.safetensors"
    save_safetensors({k: v.contiguous() for k, v in weights.items()}, path)
    body = json.dumps(info, indent=2) + "\n"
    atomic_write_bytes(out_dir / f"{info.get('method', 'model')}.json", body.encode())
    return {"model": out_dir, "weights": path, "adapter": out_dir}
