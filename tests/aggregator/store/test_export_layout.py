"""Exports name a base that loads, are named by kind, and every export path lays out the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from aggregator.cli import main
from aggregator.engine.service import AggregatorService
from aggregator.errors import StateError
from aggregator.methods.fedit.server import FeditServer
from aggregator.store.export_layout import HUB_IDS, KINDS, base_reference, export_result
from protocol.methods import NAMES


def test_every_method_has_a_kind_and_ferret_is_not_an_adapter() -> None:
    assert set(KINDS) == set(NAMES)
    assert KINDS["ferret"] == "model" and KINDS["fedit"] == "adapter"


def test_the_base_is_a_directory_or_hub_id_never_an_alias(tmp_path: Path) -> None:
    assert base_reference("smollm2-135m", tmp_path) == str(tmp_path.resolve())
    assert base_reference("smollm2-135m", None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert HUB_IDS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_reference("org/model", None) == "org/model"


def test_stock_auto_peft_model_loads_an_export(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}
    server = FeditServer({"lora": lora})
    server.restore(state, {})
    written = export_result(
        server, "fedit", tmp_path / "out", model="smollm2-135m", model_dir=tiny_model_dir
    )
    adapter = tmp_path / "out" / "adapter"
    assert written["adapter"] == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    provenance = json.loads((adapter / "edgefed-export.json").read_text())
    assert provenance["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert provenance["kind"] == "adapter" and provenance["model"] == "smollm2-135m"

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # no extra argument
    got = get_peft_model_state_dict(loaded)
    assert set(got) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(got[name], tensor)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "edgefed-export.json"
    }


def test_export_command_and_the_runs_own_export_lay_out_the_same(tmp_path: Path) -> None:
    from engine_harness import Harness, lora_state, start_round

    state = tmp_path / "state"
    h = Harness(state)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 30, lora_state(5.0))
    h.tick()
    own: Any = h
    AggregatorService.export(own, tmp_path / "own")  # what serve/local do at the end of a run
    h.close()
    result = CliRunner().invoke(
        main, ["export", "--state-dir", str(state), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert "(adapter)" in result.output
    assert sorted(files(tmp_path / "own")) == ["adapter/adapter_config.json",
                                               "adapter/adapter_model.safetensors"]  # fmt: skip
    assert files(tmp_path / "own") == files(tmp_path / "cli")
    assert (tmp_path / "cli" / "adapter" / "edgefed-export.json").is_file()


def test_a_failed_weights_write_leaves_no_file_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or read-only export dir: the write fails with a StateError naming the file, and
    neither a half file nor a temporary one is left where a reader would take it as done."""
    from safetensors import SafetensorError

    import aggregator.store.export as export

    def full_disk(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(export, "save_file", full_disk)
    target = tmp_path / "model.safetensors"
    with pytest.raises(StateError, match=r"cannot write .*model.safetensors.*No space left"):
        export.save_safetensors({"w": torch.zeros(2)}, target)
    assert list(tmp_path.iterdir()) == []
