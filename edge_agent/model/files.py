"""The files of a model directory on disk: its weights, their content hash, durable writes.

A model is identified everywhere by :func:`weights_sha256` of its directory: the sha256 of its
``*.safetensors`` files, concatenated in name order. Hashing a large model takes a while, so
:func:`hf_dir_sha256` keeps the hash in a sidecar file (:data:`HASH_SIDECAR`) next to the
weights, trusted while the weight files' sizes and mtimes are those recorded with it.

:func:`write_json_atomic`, :func:`fsync_file` and :func:`fsync_dir` write so that a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edge_agent.errors import ModelError

logger = logging.getLogger(__name__)

HASH_SIDECAR = ".edgefed-sha256.json"
"""Cached weights hash of an HF directory, keyed by the weight files' sizes and mtimes."""


def weight_files(model_dir: Path) -> list[Path]:
    """``model_dir/*.safetensors`` in name order."""
    return sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the bytes of ``model_dir/*.safetensors``, concatenated in name order.

    For a single-file model this is ``sha256sum model.safetensors``.
    """
    files = weight_files(model_dir)
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}")
    digest = hashlib.sha256()
    try:
        for path in files:
            with path.open("rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read the weights in {model_dir}: {exc}") from None
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of one file (a GGUF model) as hex."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from None


def _fingerprint(files: list[Path]) -> dict[str, list[int]]:
    out = {}
    for p in files:
        st = p.stat()
        out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def hf_dir_sha256(model_dir: Path) -> str:
    """:func:`weights_sha256`, cached in a sidecar that is trusted while sizes and mtimes match."""
    sidecar = model_dir / HASH_SIDECAR
    try:
        fingerprint = _fingerprint(weight_files(model_dir))
    except OSError as exc:
        raise ModelError(f"cannot read the weights in {model_dir}: {exc}") from None
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(sidecar.read_text())
        if cached.get("files") == fingerprint and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    sha = weights_sha256(model_dir)
    try:
        write_json_atomic(sidecar, {"files": fingerprint, "sha256": sha})
    except OSError as exc:  # a read-only model directory is fine: we hash again next time
        logger.debug("cannot cache the weights hash in %s: %s", sidecar, exc)
    return sha


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` via a synced temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the hash from other readers
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_cache_dir() -> Path:
    """``$EDGEFED_CACHE`` if set, else ``~/.cache/edgefed/models``."""
    env = os.environ.get("EDGEFED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgefed" / "models"


@contextlib.contextmanager
def file_lock(lock_path: Path, doing: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; while another process holds it, log that this
    one waits for it (``doing``: what that process does, e.g. "converting the model")."""
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info(
                "waiting for another process %s (%s)", doing, lock_path
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
