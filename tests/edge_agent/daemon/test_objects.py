from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_agent.daemon.objects import ObjectStore


def test_put_get_and_holdings(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    assert store.holdings() == [] and store.get("00" * 32) is None
    sha = store.put(b"emulator bytes")
    assert sha == hashlib.sha256(b"emulator bytes").hexdigest()
    assert store.put(b"emulator bytes") == sha  # idempotent
    assert store.get(sha) == b"emulator bytes" and store.has(sha)
    other = store.put(memoryview(b"other"))
    assert set(store.holdings()) == {sha, other}
    store.discard(other)
    assert store.holdings() == [sha]
    assert not list((tmp_path / "objects").glob(".tmp-*"))


def test_damaged_object_is_dropped(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    sha = store.put(b"x" * 100)
    (tmp_path / sha).write_bytes(b"y" * 100)
    assert store.get(sha) is None
    assert store.holdings() == []


def test_rejects_non_hash_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        ObjectStore(tmp_path).get("../etc/passwd")
