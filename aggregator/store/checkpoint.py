"""Global-state checkpoints: safetensors files written atomically, with a manifest of hashes.

Layout under ``root``::

    round-000007/
        global.safetensors       the global state of the method after round 7
        <extra>.safetensors      optional extra state (server optimizer, emulator, ...)
        manifest.json            written LAST: round, method, sha256 of every file, meta

Every file goes through :func:`atomic_write_bytes` (temp file in the same directory, flush,
fsync, rename, fsync of the directory). ``manifest.json`` is the commit point: a round directory
without a valid manifest does not exist for :meth:`CheckpointStore.latest` and
:meth:`CheckpointStore.load`, so a crash at any moment leaves the previous round loadable.
Re-saving a round first removes its manifest, for the same reason. :meth:`load` re-hashes every
file and refuses a mismatch. Tensors are stored with ``safetensors.torch.save``; nothing is ever
unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aggregator.errors import DiskFull, StateError

logger = logging.getLogger(__name__)

FORMAT = "edgefed-checkpoint/1"
MANIFEST = "manifest.json"
GLOBAL = "global"
_SUFFIX = ".safetensors"
GLOBAL_FILE = f"{GLOBAL}{_SUFFIX}"
"""The global state's file in a round's checkpoint directory (``manifest.files`` key)."""
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(f"cannot write {path}", e) from e


def write_error(what: str, exc: OSError) -> StateError:
    """A StateError for a failed write that tells the operator what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"{what}: no space left on the device; free space there and restart: every "
            "committed round and every acknowledged update is intact"
        )
    return StateError(f"{what}: {exc.strerror or exc}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Manifest:
    round: int
    method: str
    files: dict[str, str]
    """File name (``global.safetensors``, ``<extra>.safetensors``) -> sha256."""
    meta: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "round": self.round,
            "method": self.method,
            "files": self.files,
            "meta": self.meta,
            "created_at": self.created_at,
        }
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; ValueError if it is not a complete, well-typed one."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} manifest")
        rnd, method, files, meta = doc["round"], doc["method"], doc["files"], doc["meta"]
        created = doc["created_at"]
        ok = (
            type(rnd) is int
            and rnd >= 0
            and isinstance(method, str)
            and isinstance(files, dict)
            and f"{GLOBAL}{_SUFFIX}" in files
            and all(isinstance(v, str) and _SHA256.match(v) for v in files.values())
            and isinstance(meta, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
            and isinstance(created, int | float)
        )
        if not ok:
            raise ValueError("manifest fields have the wrong types")
        return cls(rnd, method, dict(files), dict(meta), float(created))


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors safetensors accepts: no two share storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise StateError(f"checkpoint entry {name!r} is not a dense tensor")
        c = t.detach().to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in seen and c.numel() > 0:
            c = c.clone()
            ptr = c.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = c
    return out


class CheckpointStore:
    """Checkpoints of one run under ``root``, keeping the ``keep`` newest rounds."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 1:
            raise StateError(f"a checkpoint store must keep at least 1 round, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def _dir(self, round: int) -> Path:
        return self.root / f"round-{round:06d}"

    def _manifest(self, rdir: Path, round: int) -> Manifest | None:
        try:
            m = Manifest.from_json((rdir / MANIFEST).read_bytes())
        except (OSError, ValueError, KeyError):
            return None
        return m if m.round == round else None

    def _scan(self) -> dict[int, Path]:
        """Every round directory, valid or not."""
        if not self.root.is_dir():
            return {}
        found: dict[int, Path] = {}
        for p in self.root.iterdir():
            m = _ROUND_DIR.match(p.name)
            if m and p.is_dir():
                found[int(m.group(1))] = p
        return found

    def rounds(self) -> list[int]:
        """Rounds with a valid manifest, oldest first."""
        return sorted(r for r, p in self._scan().items() if self._manifest(p, r) is not None)

    def latest(self) -> int | None:
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def manifest(self, round: int | None = None) -> Manifest | None:
        """The manifest of ``round`` (default: the latest), without reading the tensors."""
        if round is None:
            round = self.latest()
            if round is None:
                return None
        return self._manifest(self._dir(round), round)

    def save(
        self,
        round: int,
        tensors: Mapping[str, torch.Tensor],
        *,
        method: str,
        meta: Mapping[str, str] | None = None,
        extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> Manifest:
        """Write round ``round`` (files first, manifest last) and prune old rounds."""
        meta = dict(meta or {})
        extra = dict(extra or {})
        if round < 0:
            raise StateError(f"checkpoint round must be >= 0, got {round}")
        bad = [n for n in extra if n == GLOBAL or not _EXTRA_NAME.match(n)]
        if bad:
            raise StateError(f"invalid extra checkpoint names: {bad}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise StateError("checkpoint meta must map strings to strings")
        rdir = self._dir(round)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if (rdir / MANIFEST).exists():  # re-save: the round stops existing until done
                (rdir / MANIFEST).unlink()
                fsync_dir(rdir)
            rdir.mkdir(exist_ok=True)
            fsync_dir(self.root)
        except OSError as e:
            raise write_error(f"cannot prepare checkpoint directory {rdir}", e) from e

        files: dict[str, str] = {}
        st_meta = {"edgefed.round": str(round), "edgefed.method": method}
        for name, group in [(GLOBAL, tensors), *extra.items()]:
            data = st_save(_cpu_tensors(group), metadata={**st_meta, "edgefed.part": name})
            fname = f"{name}{_SUFFIX}"
            atomic_write_bytes(rdir / fname, data)
            files[fname] = hashlib.sha256(data).hexdigest()
        manifest = Manifest(round, method, files, meta, time.time())
        atomic_write_bytes(rdir / MANIFEST, manifest.to_json())
        logger.info("checkpoint round %d saved in %s", round, rdir)
        self._tidy(rdir, files)
        self._prune(round)
        return manifest

    def _tidy(self, rdir: Path, files: Mapping[str, str]) -> None:
        """Remove files of an earlier save of the same round and stale temp files."""
        try:
            for p in rdir.iterdir():
                if p.name != MANIFEST and p.name not in files:
                    p.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not tidy checkpoint directory %s: %s", rdir, e)

    def _remove(self, rdir: Path) -> None:
        (rdir / MANIFEST).unlink(missing_ok=True)  # invalid first, then gone
        shutil.rmtree(rdir, ignore_errors=True)

    def _prune(self, just_saved: int) -> None:
        valid = set(self.rounds())
        keep = set(sorted(valid)[-self.keep :]) | {just_saved}
        try:
            for r, p in self._scan().items():
                if r not in keep:
                    self._remove(p)
                    logger.debug("pruned checkpoint %s", p)
            fsync_dir(self.root)
        except OSError as e:  # pruning is housekeeping: the new round is safely written
            logger.warning("could not prune old checkpoints in %s: %s", self.root, e)

    def load(
        self, round: int | None = None
    ) -> tuple[dict[str, torch.Tensor], Manifest, dict[str, dict[str, torch.Tensor]]]:
        """Global tensors, manifest and extras of ``round`` (default: latest), hashes checked."""
        if round is None:
            round = self.latest()
            if round is None:
                raise StateError(f"no checkpoint in {self.root}")
        rdir = self._dir(round)
        manifest = self._manifest(rdir, round)
        if manifest is None:
            raise StateError(f"no valid checkpoint for round {round} in {self.root}")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for fname, expected in manifest.files.items():
            path = rdir / fname
            if "/" in fname or not fname.endswith(_SUFFIX):
                raise StateError(
                    f"checkpoint manifest {rdir / MANIFEST} names a bad file {fname!r}"
                )
            try:
                data = path.read_bytes()
            except OSError as e:
                raise StateError(f"checkpoint file {path} is unreadable: {e}") from e
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise StateError(
                    f"checkpoint file {path} is corrupt: sha256 {actual}, manifest says {expected}"
                )
            try:
                parts[fname[: -len(_SUFFIX)]] = st_load(data)
            except SafetensorError as e:
                raise StateError(f"checkpoint file {path} is not valid safetensors: {e}") from e
        tensors = parts.pop(GLOBAL)
        return tensors, manifest, parts
