"""Content hash of a base model directory, computed the same way the agents compute it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aggregator.errors import ConfigError


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the ``*.safetensors`` files of ``model_dir``, sorted by name."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors weights to hash")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
