"""Large objects an agent keeps between tasks and restarts, addressed by their sha256.

A method that is sent something big once (FedBiOT's emulator) stores it here; the agent's Hello
lists what it holds (``Hello.holds``), so the aggregator sends it again only to an agent that
does not hold it. Each object is one file named by its hash, written atomically; a file whose
content no longer matches its name (a torn disk, an edit) is deleted and reported as absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_LISTED = 64
"""At most this many hashes go into a Hello (the protocol allows 256)."""


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256

    def put(self, data: bytes | memoryview) -> str:
        """Store ``data``; returns its sha256 (storing the same bytes twice is a no-op)."""
        sha = hashlib.sha256(data).hexdigest()
        target = self._path(sha)
        if target.exists():
            return sha
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get(self, sha256: str) -> bytes | None:
        """The object's bytes, or None when absent or damaged (then it is deleted)."""
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            logger.warning("object %s is damaged; deleted", sha256[:12])
            path.unlink(missing_ok=True)
            return None
        return data

    def has(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def discard(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def holdings(self) -> list[str]:
        """Hashes held, newest first, at most :data:`MAX_LISTED`."""
        if not self.root.is_dir():
            return []
        files = [p for p in self.root.iterdir() if _SHA.match(p.name)]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in files[:MAX_LISTED]]
