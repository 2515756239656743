"""Pre-quantized checkpoints: each precision the agent loads, quantized once and saved.

Quantizing at every start costs the agent twice: bitsandbytes' CPU quantizer takes seconds and
leaves its temporaries in the heap, and the weights it does not quantize (the embedding, the
norms) stay zero-copy views into the fp32 safetensors mapping, which keeps the whole fp32 file
resident. :func:`quantized_checkpoint` quantizes a base model once per (precision, compute
dtype) with transformers and bitsandbytes, saves it with ``save_pretrained`` (which reloads
with identical logits on transformers 5.24 / bitsandbytes 0.50.2: a test checks it), and
returns that directory, which :func:`edge_agent.model.loader.load_base` then loads directly.

The model's identity does not change: tasks, ``Hello`` and the aggregator's checks keep using
the base's :attr:`~edge_agent.model.store.ResolvedModel.sha256`. Each checkpoint records the
hash of the base it was made from, and of its own weights, and the library versions that wrote
it; one that does not match is made again.

Layout (under the model cache, ``$EDGEFED_CACHE`` or ``~/.cache/edgefed/models``)::

    <cache>/quantized/<first 16 hex of the base sha256>-<quant>-<dtype>/
        config.json, model.safetensors, edgefed-quant.json (written last)
    <cache>/quantized/<name>.lock            flock held while quantizing
    <cache>/quantized/.<name>.tmp-<random>/  quantization in progress (renamed when done)
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ModelError
from edge_agent.model.files import (
    file_lock,
    fsync_dir,
    fsync_file,
    weight_files,
    weights_sha256,
    write_json_atomic,
)

if TYPE_CHECKING:
    from edge_agent.model.resolved import ResolvedModel

logger = logging.getLogger(__name__)

MARKER = "edgefed-quant.json"
FORMAT = 1
SUBDIR = "quantized"


def library_versions() -> dict[str, str]:
    """The versions whose serialization a checkpoint depends on."""
    return {name: version(name) for name in ("transformers", "bitsandbytes", "safetensors")}


def checkpoint_name(base_sha256: str, quant: str, dtype: str) -> str:
    return f"{base_sha256[:16]}-{quant}-{dtype}"


def read_marker(target: Path, base_sha256: str) -> dict[str, Any] | None:
    """The marker of a complete checkpoint made from ``base_sha256`` by these libraries."""
    try:
        marker = json.loads((target / MARKER).read_text())
        files = marker["files"]
        if (
            marker.get("format") != FORMAT
            or marker.get("base_sha256") != base_sha256
            or marker.get("libraries") != library_versions()
            or not isinstance(files, dict)
            or not files
        ):
            return None
        for name, size in files.items():
            if (target / name).stat().st_size != size:
                logger.warning("quantized checkpoint %s: %s has the wrong size", target, name)
                return None
        return dict(marker)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quantized_checkpoint(
    resolved: ResolvedModel,
    quant: str,
    dtype: str,
    load_kwargs: dict[str, Any],
    cache_dir: Path,
) -> Path:
    """The checkpoint directory of ``resolved`` in ``quant`` (rest and compute in ``dtype``).

    ``load_kwargs`` are the ``from_pretrained`` arguments that quantize the base (its
    ``quantization_config`` and ``dtype``); they are used only when the checkpoint is made.
    """
    root = cache_dir.expanduser() / SUBDIR
    name = checkpoint_name(resolved.sha256, quant, dtype)
    target = root / name
    if read_marker(target, resolved.sha256) is not None:
        logger.debug("quantized checkpoint hit: %s", target)
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / f"{name}.lock", "quantizing the model"):
            if read_marker(target, resolved.sha256) is None:
                _make(resolved, quant, dtype, load_kwargs, root, target)
    except OSError as exc:
        raise ModelError(f"cannot save the {quant} checkpoint of {resolved.name}: {exc}") from None
    return target


def _make(
    resolved: ResolvedModel,
    quant: str,
    dtype: str,
    load_kwargs: dict[str, Any],
    root: Path,
    target: Path,
) -> None:
    """Quantize into a temporary directory, write the marker last, rename it into place."""
    from transformers import AutoModelForCausalLM

    for stale in root.glob(f".{target.name}.tmp-*"):  # left by a crashed quantization
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.info("replacing the outdated or incomplete checkpoint %s", target)
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    start = time.perf_counter()
    try:
        logger.info("quantizing %s to %s (%s), once", resolved.name, quant, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **load_kwargs)
            model.save_pretrained(tmp, safe_serialization=True)
        except Exception as exc:  # damaged files fail in many ways (safetensors, json, bnb...)
            raise ModelError(f"cannot quantize {resolved.name} to {quant}: {exc}") from None
        del model
        release_heap()
        files = {p.name: p.stat().st_size for p in weight_files(tmp)}
        for path in tmp.iterdir():
            fsync_file(path)
        marker = {
            "format": FORMAT,
            "base_sha256": resolved.sha256,
            "quant": quant,
            "dtype": dtype,
            "sha256": weights_sha256(tmp),
            "files": files,
            "libraries": library_versions(),
        }
        write_json_atomic(tmp / MARKER, marker)
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(root)
        logger.info("saved %s in %.1f s", target, time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def release_heap() -> None:
    """Collect, then hand glibc's free heap pages back to the kernel (``malloc_trim(0)``).

    bitsandbytes' CPU quantizer allocates and frees many temporaries; glibc keeps the freed
    pages in the process, where they count as resident until trimmed. A no-op off glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
