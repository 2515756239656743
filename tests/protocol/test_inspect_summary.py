"""edgefed-inspect summarises a large payload by default; --all and --json stay complete."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from protocol.inspect_cli import SUMMARY_ROWS, main
from protocol.payloads import encode_lora

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"


def big_adapter(layers: int) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(layers):
        for module in ("q", "v"):
            state[PREFIX.format(layer, module, "A")] = torch.ones(4, 16)
            state[PREFIX.format(layer, module, "B")] = torch.ones(16, 4)
    return state


def test_default_is_a_summary_all_and_json_are_complete(tmp_path: Path) -> None:
    state = big_adapter(30)  # 120 tensors
    assert len(state) > SUMMARY_ROWS
    path = tmp_path / "update.safetensors"
    path.write_bytes(encode_lora(state, method="fedit", round=1))
    runner = CliRunner()

    summary = runner.invoke(main, [str(path)])
    assert summary.exit_code == 0, summary.output
    rows = [line for line in summary.output.splitlines() if line.startswith("base_model.")]
    assert len(rows) == SUMMARY_ROWS // 2
    assert f"... {len(state) - len(rows)} more tensors (--all lists every one)" in summary.output
    assert f"F32: {len(state)} tensors, {len(state) * 256:,} B" in summary.output
    assert f"{len(state)} tensors; raw tensor bytes" in summary.output

    every = runner.invoke(main, [str(path), "--all"])
    listed = [line for line in every.output.splitlines() if line.startswith("base_model.")]
    assert len(listed) == len(state) and "more tensors" not in every.output

    report = json.loads(runner.invoke(main, [str(path), "--json"]).output)
    assert len(report["tensors"]) == len(state)
