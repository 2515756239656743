"""Checkpoints: bit-identical round trips, manifest-last commit, tamper checks, pruning, SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import aggregator.store.checkpoint as ckpt
from aggregator.errors import StateError
from aggregator.store.checkpoint import CheckpointStore, Manifest, atomic_write_bytes, sha256_file

REPO = Path(__file__).resolve().parents[3]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=g)
    return {
        "layers.0.lora_A": torch.randn(4, 16, generator=g),
        "layers.0.lora_B": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "layers.1.lora_A": base.t(),  # non-contiguous
        "layers.1.lora_B": base[:3],  # shares storage with the one above
        "counts": torch.arange(5, dtype=torch.int64) * seed,
        "scale": torch.tensor(0.1 * seed, dtype=torch.float16),
    }


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, x in a.items():
        assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
        assert torch.equal(_bytes(x), _bytes(b[k])), k


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def test_atomic_write_and_sha(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, memoryview(b"new contents"))
    assert p.read_bytes() == b"new contents"
    assert sha256_file(p) == hashlib.sha256(b"new contents").hexdigest()
    assert [q.name for q in tmp_path.iterdir()] == ["x.bin"]  # no temp file left
    with pytest.raises(StateError, match="cannot write"):
        atomic_write_bytes(tmp_path / "missing-dir" / "y.bin", b"z")


def test_round_trip_bit_identical(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest() is None and store.rounds() == []
    with pytest.raises(StateError, match="no checkpoint"):
        store.load()
    state, opt = _state(3), {"m": torch.full((3, 3), -0.0), "v": torch.ones(2) * 1e-30}
    man = store.save(
        7, state, method="fedpipe", meta={"base": "smollm2"}, extra={"server_opt": opt}
    )
    rdir = tmp_path / "ckpt" / "round-000007"
    assert sorted(p.name for p in rdir.iterdir()) == [
        "global.safetensors",
        "manifest.json",
        "server_opt.safetensors",
    ]
    assert man.files == {
        "global.safetensors": sha256_file(rdir / "global.safetensors"),
        "server_opt.safetensors": sha256_file(rdir / "server_opt.safetensors"),
    }
    assert store.latest() == 7
    tensors, loaded, extra = store.load()
    _assert_identical(tensors, state)
    _assert_identical(extra["server_opt"], opt)
    assert set(extra) == {"server_opt"}
    assert torch.signbit(extra["server_opt"]["m"]).all()  # -0.0 kept bit for bit
    assert loaded == man and loaded.round == 7 and loaded.method == "fedpipe"
    assert loaded.meta == {"base": "smollm2"}
    assert Manifest.from_json((rdir / "manifest.json").read_bytes()) == man


def test_half_written_round_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1), method="fedit")
    half = tmp_path / "round-000002"
    half.mkdir()
    (half / "global.safetensors").write_bytes(
        (tmp_path / "round-000001" / "global.safetensors").read_bytes()
    )
    assert store.latest() == 1 and store.rounds() == [1]
    (half / "manifest.json").write_text('{"format": "edgefed-checkpoint/1", "round": 2')  # torn
    assert store.latest() == 1
    with pytest.raises(StateError, match="no valid checkpoint for round 2"):
        store.load(2)
    _assert_identical(store.load()[0], _state(1))


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(0, _state(1), method="fedit", extra={"emu": {"w": torch.ones(4)}})
    path = tmp_path / "round-000000" / "emu.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value
    path.write_bytes(bytes(data))
    assert store.latest() == 0  # the manifest is there: corruption is loud, not skipped
    with pytest.raises(StateError, match="emu.safetensors is corrupt: sha256"):
        store.load()
    path.unlink()
    with pytest.raises(StateError, match="unreadable"):
        store.load(0)


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(5):
        store.save(r, _state(r), method="fedit")
    assert store.rounds() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000003", "round-000004"]
    store.save(1, _state(1), method="fedit")  # an older round, just written: kept
    assert store.rounds() == [1, 3, 4]
    store.save(5, _state(5), method="fedit")
    assert store.rounds() == [4, 5]
    _assert_identical(store.load(4)[0], _state(4))


def test_resave_drops_the_round_until_its_new_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1), method="slora")
    store.save(2, _state(2), method="slora", extra={"old": {"x": torch.zeros(1)}})
    real = ckpt.atomic_write_bytes

    def fail_on_manifest(path: Path, data: bytes | memoryview) -> None:
        if path.name == "manifest.json":
            raise StateError("disk full")
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fail_on_manifest)
    with pytest.raises(StateError, match="disk full"):
        store.save(2, _state(20), method="slora")
    assert store.latest() == 1  # never a round 2 whose files disagree with its manifest
    monkeypatch.undo()
    store.save(2, _state(20), method="slora")
    tensors, man, extra = store.load()
    _assert_identical(tensors, _state(20))
    assert extra == {} and not (tmp_path / "round-000002" / "old.safetensors").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="keep at least 1"):
        CheckpointStore(tmp_path, keep=0)
    store = CheckpointStore(tmp_path)
    with pytest.raises(StateError, match="invalid extra checkpoint names"):
        store.save(0, {}, method="x", extra={"../evil": {}})
    with pytest.raises(StateError, match="invalid extra checkpoint names"):
        store.save(0, {}, method="x", extra={"global": {}})
    with pytest.raises(StateError, match="not a dense tensor"):
        store.save(0, {"s": torch.eye(3).to_sparse()}, method="x")


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    import aggregator.store.checkpoint as ckpt

    root, where = Path(sys.argv[1]), sys.argv[2]
    store = ckpt.CheckpointStore(root)
    store.save(1, {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, method="fedit")
    real_write, real_replace = ckpt.atomic_write_bytes, os.replace

    def write(path, data):
        if where == "before_manifest" and path.name == "manifest.json":
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)

    def replace(src, dst):
        if where == "before_rename":  # tensor bytes fsynced in the temp file, not renamed
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    ckpt.atomic_write_bytes = write
    os.replace = replace
    store.save(2, {"w": torch.zeros(3, 4)}, method="fedit")
    """
)


@pytest.mark.parametrize("where", ["before_manifest", "before_rename"])
def test_sigkill_mid_save_leaves_previous_round(tmp_path: Path, where: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), where],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    half = tmp_path / "round-000002"
    assert half.is_dir() and not (half / "manifest.json").exists()
    leftovers = sorted(p.name for p in half.iterdir())
    if where == "before_manifest":
        assert leftovers == ["global.safetensors"]
    else:
        assert len(leftovers) == 1 and leftovers[0].startswith(".global.safetensors.tmp-")

    store = CheckpointStore(tmp_path)
    assert store.latest() == 1
    tensors, man, _ = store.load()
    assert man.round == 1
    assert torch.equal(tensors["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    # the next save of round 2 succeeds and clears the debris
    store.save(2, {"w": torch.ones(2)}, method="fedit")
    assert sorted(p.name for p in half.iterdir()) == ["global.safetensors", "manifest.json"]
    assert json.loads((half / "manifest.json").read_text())["round"] == 2
