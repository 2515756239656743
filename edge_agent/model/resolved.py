"""A base model ready to load: its HF directory and the content hash of its weights.

:func:`edge_agent.model.store.resolve_model` makes one; :func:`edge_agent.model.loader.load_base`
loads one. It lives on its own so that the loader needs nothing of the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready to load: an HF directory and the content hash of its weights."""

    name: str
    """The alias or the spec as given."""
    path: Path
    """HF directory: config.json, *.safetensors, tokenizer files."""
    sha256: str
    """:func:`~edge_agent.model.files.weights_sha256` of ``path`` (hex); the same on every
    machine."""
