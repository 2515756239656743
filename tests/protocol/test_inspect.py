"""edgefed-inspect: exact numbers for payloads, adapters, checkpoints and captured messages; one
line and exit status 2 for anything missing, unknown or corrupt."""

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from protocol import randomness
from protocol.frames import encode as encode_frames
from protocol.frames import save_message
from protocol.inspect_cli import main
from protocol.messages import TaskResult
from protocol.payloads import encode_dense, encode_lora, encode_masked

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj"


def lora_state() -> dict[str, torch.Tensor]:
    """2 layers; q_proj 32 -> 32, v_proj 32 -> 16, rank 4."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(2):
        for module, out in (("q", 32), ("v", 16)):
            p = PREFIX.format(layer, module)
            state[f"{p}.lora_A.weight"] = torch.randn(4, 32, generator=g)
            state[f"{p}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    return state


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def run_json(path: Path) -> dict:
    result = run(str(path), "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_fails(path: Path, why: str) -> None:
    result = run(str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"edgefed-inspect: {path}: ")
    assert why in lines[0]
    assert "Traceback" not in result.output


def test_lora_payload_json_has_exact_byte_accounting(tmp_path: Path) -> None:
    data = encode_lora(lora_state(), method="fedit", round=5)
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    report = run_json(path)
    assert (report["format"], report["kind"], report["method"], report["round"]) == (
        "payload",
        "lora",
        "fedit",
        5,
    )
    rows = {r["name"]: r for r in report["tensors"]}
    assert len(rows) == 8
    q_a = rows[PREFIX.format(1, "q") + ".lora_A.weight"]
    assert (q_a["shape"], q_a["dtype"], q_a["nbytes"], q_a["density"]) == (
        [4, 32],
        "F32",
        512,
        None,
    )
    v_b = rows[PREFIX.format(0, "v") + ".lora_B.weight"]
    assert (v_b["shape"], v_b["nbytes"]) == ([16, 4], 256)
    # per layer: q A 512 + q B 512 + v A 512 + v B 256 = 1792 bytes; 2 layers
    assert report["raw_nbytes"] == 3584
    assert report["wire_nbytes"] == len(data) == path.stat().st_size
    header = 8 + struct.unpack("<Q", data[:8])[0]
    assert report["header_nbytes"] == header
    assert report["overhead_nbytes"] == header == len(data) - 3584
    assert report["overhead_pct"] == round(100 * header / 3584, 4)
    assert report["lora"] == {"modules": 4, "ranks": [4]}


def test_text_output_shows_rows_and_totals(tmp_path: Path) -> None:
    path = tmp_path / "update.safetensors"
    data = encode_lora(lora_state(), method="fedit", round=5)
    path.write_bytes(data)
    result = run(str(path))
    assert result.exit_code == 0
    out = result.stdout
    assert "kind lora, method fedit, round 5" in out
    assert PREFIX.format(1, "v") + ".lora_B.weight  [16, 4]" in out
    assert f"raw tensor bytes 3,584 B, bytes on wire {len(data):,} B" in out


def test_masked_payload_density_is_stored_values_over_numel(tmp_path: Path) -> None:
    seed, density, name = 7, 0.05, "layers.0.mlp.up_proj.weight"
    count = randomness.mask_count(randomness.stream_key(seed, name), 40 * 50, density)
    data = encode_masked(
        {name: torch.ones(count)},
        {name: (40, 50)},
        seed=seed,
        density=density,
        method="slora",
        round=1,
    )
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    report = run_json(path)
    (row,) = report["tensors"]
    assert row["shape"] == [40, 50]
    assert row["nbytes"] == 4 * count
    assert row["density"] == count / 2000
    assert report["masked"] == {"seed": 7, "density": 0.05}
    assert report["raw_nbytes"] == 4 * count


def test_plain_safetensors_file_is_read_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(
        {"embed.weight": torch.zeros(10, 4), "scale": torch.zeros(3, dtype=torch.float64)}, path
    )
    report = run_json(path)
    assert report["format"] == "safetensors"
    rows = {r["name"]: (r["shape"], r["dtype"], r["nbytes"]) for r in report["tensors"]}
    assert rows == {"embed.weight": ([10, 4], "F32", 160), "scale": ([3], "F64", 24)}
    assert report["raw_nbytes"] == 184
    assert report["wire_nbytes"] == path.stat().st_size


def test_peft_adapter_directory_shows_rank_alpha_and_targets(tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(lora_state(), tmp_path / "adapter_model.safetensors")
    report = run_json(tmp_path)
    assert report["format"] == "peft-adapter"
    assert report["adapter"] == config
    assert report["file"]["raw_nbytes"] == 3584
    assert report["file"]["lora"] == {"modules": 4, "ranks": [4]}
    text = run(str(tmp_path)).stdout
    assert (
        "r: 4" in text
        and "lora_alpha: 8" in text
        and "target_modules: ['v_proj', 'q_proj']" in text
    )


def make_checkpoint(root: Path) -> bytes:
    data = encode_dense(
        {"layers.0.w": torch.ones(8, 8), "layers.1.w": torch.ones(8, 8)}, method="fedbiot", round=3
    )
    (root / "global.safetensors").write_bytes(data)
    (root / "state.json").write_text('{"stage": 2}')
    files = [
        {"path": name, "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
        for name in ("global.safetensors", "state.json")
    ]
    (root / "manifest.json").write_text(json.dumps({"round": 3, "files": files}))
    return data


def test_checkpoint_directory_hashes_are_verified(tmp_path: Path) -> None:
    data = make_checkpoint(tmp_path)
    report = run_json(tmp_path)
    assert report["format"] == "checkpoint"
    assert report["manifest"] == {"round": 3}
    assert [f["name"] for f in report["files"]] == ["global.safetensors", "state.json"]
    assert report["raw_nbytes"] == 2 * 64 * 4
    assert report["wire_nbytes"] == len(data)
    (tmp_path / "state.json").write_text('{"stage": 3}')
    assert_fails(tmp_path, "state.json: sha256")
    (tmp_path / "state.json").unlink()
    assert_fails(tmp_path, "state.json: listed in manifest.json but missing")


def test_captured_message_shows_header_and_each_payload_blob(tmp_path: Path) -> None:
    payload = encode_lora(lora_state(), method="fedit", round=2)
    header = TaskResult(
        run_id="run-1", round=2, task_id="t-1", agent_id="edge-1", method="fedit", num_examples=10
    )
    frames = encode_frames(header, {"update": payload, "notes": b"not a payload"})
    path = tmp_path / "msg.bin"
    save_message(path, frames)
    report = run_json(path)
    assert report["format"] == "message"
    assert (report["type"], report["run_id"], report["round"]) == ("task_result", "run-1", 2)
    update, notes = report["blobs"]
    assert update["payload"]["kind"] == "lora"
    assert update["payload"]["raw_nbytes"] == 3584
    assert notes == {
        "name": "notes",
        "nbytes": 13,
        "sha256": hashlib.sha256(b"not a payload").hexdigest(),
        "payload": None,
    }
    wire = sum(len(bytes(f)) for f in frames)
    assert report["wire_nbytes"] == wire
    assert report["raw_nbytes"] == 3584
    assert report["file_nbytes"] == 8 + 8 * 4 + wire


def test_captured_message_with_a_corrupt_blob_fails(tmp_path: Path) -> None:
    payload = bytearray(encode_lora(lora_state(), method="fedit", round=2))
    header = TaskResult(task_id="t-1", agent_id="edge-1", method="fedit", num_examples=1)
    frames = encode_frames(header, {"update": bytes(payload)})
    payload[-1] ^= 0xFF
    path = tmp_path / "msg.bin"
    save_message(path, [frames[0], frames[1], bytes(payload)])
    assert_fails(path, "blob 'update': sha256 differs")
    path.write_bytes(path.read_bytes()[:-10])
    assert_fails(path, "runs past the end")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"hello, this is not a payload at all", "not a safetensors file, payload or message"),
        (b"", "not a safetensors file"),
        (b"EFEDMSG1" + struct.pack("<Q", 3) + b"abc", "signature"),
    ],
)
def test_garbage_files_exit_2_with_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    assert_fails(path, why)


def test_missing_path_and_unknown_directory_exit_2(tmp_path: Path) -> None:
    assert_fails(tmp_path / "nope.safetensors", "no such file or directory")
    assert_fails(tmp_path, "neither a peft adapter nor a checkpoint")


def test_corrupt_payload_files_exit_2(tmp_path: Path) -> None:
    data = encode_lora(lora_state(), method="fedit", round=0)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-100])
    assert_fails(path, "corrupt safetensors file: tensors cover")
    nan = encode_dense({"w": torch.ones(3)}, method="fedit", round=0)
    at = nan.rindex(struct.pack("<f", 1.0))
    path.write_bytes(nan[:at] + struct.pack("<f", math.nan) + nan[at + 4 :])
    assert_fails(path, "edgefed payload rejected: 'w' holds NaN")
