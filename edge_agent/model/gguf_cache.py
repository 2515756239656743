"""The GGUF cache: a ``.gguf`` model converted once into a plain safetensors HF directory.

transformers can read a GGUF file but not train it or save it; :func:`converted_gguf` dequantizes
the file into fp32 safetensors the first time and returns that directory ever after.

Cache layout (one directory per GGUF file, keyed by the file's content)::

    <cache_dir>/<first 16 hex of sha256(gguf)>/   config.json, model.safetensors,
                                                   tokenizer files, edgefed-model.json
    <cache_dir>/<key>.lock                         flock held while converting
    <cache_dir>/.<key>.tmp-<random>/               conversion in progress (renamed when done)

``edgefed-model.json`` is written last, inside the temporary directory, which is then renamed
into place: a directory under its final name is always complete, and a crash mid-conversion
leaves only a temporary directory that the next conversion removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from edge_agent.errors import ModelError
from edge_agent.model.files import (
    file_lock,
    file_sha256,
    fsync_dir,
    fsync_file,
    weight_files,
    weights_sha256,
    write_json_atomic,
)
from edge_agent.model.loader import hf_progress

logger = logging.getLogger(__name__)

MARKER = "edgefed-model.json"
"""Written last into a converted cache directory; its presence means the conversion finished."""
CACHE_FORMAT = 1


def _read_marker(target: Path) -> str | None:
    """The weights sha256 recorded in a complete cache directory, or None if it is not one."""
    try:
        marker = json.loads((target / MARKER).read_text())
        files = marker["files"]
        if marker.get("format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
            return None
        for name, size in files.items():
            if (target / name).stat().st_size != size:
                logger.warning("cached model %s: %s has the wrong size", target, name)
                return None
        return str(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def converted_gguf(gguf: Path, cache: Path, *, progress: bool) -> tuple[Path, str]:
    """The cache directory of ``gguf`` and its weights hash, converting under a lock if needed."""
    gguf_sha = file_sha256(gguf)
    key = gguf_sha[:16]
    target = cache / key
    sha = _read_marker(target)
    if sha is not None:
        logger.debug("model cache hit: %s", target)
        return target, sha
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with file_lock(cache / f"{key}.lock", "converting the model"):
            sha = _read_marker(target)  # another process may have finished while we waited
            if sha is None:
                sha = _convert_into(gguf, gguf_sha, cache, target, progress=progress)
    except OSError as exc:
        raise ModelError(f"cannot convert {gguf} into {cache}: {exc}") from None
    return target, sha


def _convert_into(gguf: Path, gguf_sha: str, cache: Path, target: Path, *, progress: bool) -> str:
    """Convert under the lock (temp dir, marker last, rename into place); the weights hash."""
    key = target.name
    for stale in cache.glob(f".{key}.tmp-*"):  # left by a crashed conversion
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # a directory under the final name without a valid marker
        logger.warning("removing incomplete model cache %s", target)
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
    try:
        start = time.perf_counter()
        logger.info("converting %s into %s (once)", gguf.name, target)
        _gguf_to_hf_dir(gguf, tmp, progress=progress)
        sha = weights_sha256(tmp)
        files = {p.name: p.stat().st_size for p in weight_files(tmp)}
        for path in tmp.iterdir():
            fsync_file(path)
        marker = {
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "source_sha256": gguf_sha,
            "sha256": sha,
            "files": files,
        }
        write_json_atomic(tmp / MARKER, marker)
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(cache)
        logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
        return sha
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_to_hf_dir(gguf: Path, out: Path, *, progress: bool) -> None:
    """Dequantize ``gguf`` with transformers and save it as a plain (fp32) safetensors model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hf_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # the GGUF reader fails in many ways on a damaged file
            raise ModelError(f"cannot read GGUF model {gguf}: {exc}") from None
        # A GGUF-loaded model refuses save_pretrained: move its weights into a plain model.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        del model
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
