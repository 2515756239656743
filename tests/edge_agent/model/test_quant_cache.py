"""Pre-quantized checkpoints: saved once, reloaded with identical logits, the base's identity kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from edge_agent.errors import ModelError
from edge_agent.model import quant_cache
from edge_agent.model.loader import _quantizing_kwargs, compute_dtype_name, load_base
from edge_agent.model.store import ResolvedModel

IDS = torch.tensor([[1, 17, 923, 4011, 22, 7, 30000, 2], [5, 6, 7, 8, 9, 10, 11, 12]])


def checkpoints(cache: Path, quant: str) -> list[Path]:
    return [p for p in (cache / "quantized").glob(f"*-{quant}-*") if p.is_dir()]


def logits(model: Any) -> torch.Tensor:
    for module in model.modules():  # as load_base does for NF4 (see _disable_cpu_repacking)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("quant", ["nf4", "int8", "bf16"])
def test_checkpoint_reloads_with_the_logits_of_quantizing_on_the_fly(
    tiny_resolved: ResolvedModel, tmp_path: Path, quant: Any
) -> None:
    dtype = compute_dtype_name(quant, "cpu")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    on_the_fly = AutoModelForCausalLM.from_pretrained(
        tiny_resolved.path, **_quantizing_kwargs(quant, torch_dtype, "cpu")
    )
    loaded, _ = load_base(tiny_resolved, quant, device="cpu", cache_dir=tmp_path)
    target = tmp_path / "quantized" / f"{tiny_resolved.sha256[:16]}-{quant}-{dtype}"
    marker = json.loads((target / quant_cache.MARKER).read_text())
    assert marker["base_sha256"] == tiny_resolved.sha256  # the identity stays the base's
    assert marker["sha256"] != tiny_resolved.sha256
    assert marker["libraries"] == quant_cache.library_versions()
    expected = logits(on_the_fly)
    assert torch.isfinite(expected).all()
    assert torch.equal(logits(loaded), expected)
    weights = {p.dtype for n, p in loaded.named_parameters() if "norm" in n or "embed" in n}
    assert weights == {torch_dtype}


def test_second_load_is_a_hit_and_fp32_makes_no_checkpoint(
    tiny_resolved: ResolvedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_base(tiny_resolved, "fp32", device="cpu", cache_dir=tmp_path)
    assert not (tmp_path / "quantized").exists()
    load_base(tiny_resolved, "nf4", device="cpu", cache_dir=tmp_path)
    [target] = checkpoints(tmp_path, "nf4")
    before = (target / "model.safetensors").stat().st_mtime_ns

    def no_quantizing(*args: object) -> None:
        raise AssertionError("quantized again")

    monkeypatch.setattr(quant_cache, "_make", no_quantizing)
    load_base(tiny_resolved, "nf4", device="cpu", cache_dir=tmp_path)
    assert (target / "model.safetensors").stat().st_mtime_ns == before


def test_checkpoint_of_other_libraries_or_truncated_is_made_again(
    tiny_resolved: ResolvedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_base(tiny_resolved, "int8", device="cpu", cache_dir=tmp_path)
    [target] = checkpoints(tmp_path, "int8")
    good = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(good[: len(good) // 2])
    model, _ = load_base(tiny_resolved, "int8", device="cpu", cache_dir=tmp_path)
    assert (target / "model.safetensors").read_bytes() == good
    marker = json.loads((target / quant_cache.MARKER).read_text())
    marker["libraries"]["bitsandbytes"] = "0.0.1"
    (target / quant_cache.MARKER).write_text(json.dumps(marker))
    calls: list[str] = []
    make = quant_cache._make
    monkeypatch.setattr(quant_cache, "_make", lambda *a: calls.append("made") or make(*a))
    load_base(tiny_resolved, "int8", device="cpu", cache_dir=tmp_path)
    assert calls == ["made"]
    assert quant_cache.read_marker(target, tiny_resolved.sha256) is not None


def test_crash_mid_quantization_leaves_no_checkpoint_and_is_redone(
    tiny_resolved: ResolvedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(quant_cache, "weights_sha256", crash)
    with pytest.raises(ModelError, match="cannot save the nf4 checkpoint of .*disk full"):
        load_base(tiny_resolved, "nf4", device="cpu", cache_dir=tmp_path)
    root = tmp_path / "quantized"
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    model, _ = load_base(tiny_resolved, "nf4", device="cpu", cache_dir=tmp_path)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


def test_compute_dtype_must_fit_the_quantization(
    tiny_resolved: ResolvedModel, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="compute dtype 'fp32' does not fit quantization 'bf16'"):
        load_base(tiny_resolved, "bf16", device="cpu", cache_dir=tmp_path, dtype="fp32")
    model, _ = load_base(tiny_resolved, "nf4", device="cpu", cache_dir=tmp_path, dtype="fp32")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_model_prepare_saves_the_checkpoints_asked_for(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from edge_agent.cli import main

    args = ["model", "prepare", "--model", str(tiny_model_dir), "--cache", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--quant", "nf4", "--quant", "int8"])
    assert result.exit_code == 0, result.output
    sha = json.loads(result.stdout)["sha256"]
    assert sorted(p.name for p in (tmp_path / "quantized").iterdir() if p.is_dir()) == [
        f"{sha[:16]}-int8-{compute_dtype_name('int8', 'cpu')}",
        f"{sha[:16]}-nf4-{compute_dtype_name('nf4', 'cpu')}",
    ]
    for target in checkpoints(tmp_path, "nf4") + checkpoints(tmp_path, "int8"):
        assert quant_cache.read_marker(target, sha) is not None
    bad = CliRunner().invoke(main, [*args, "--quant", "int4"])
    assert bad.exit_code == 2 and "'int4' is not one of" in bad.output


def test_gradient_checkpointing_defaults_on_for_a_quantized_base_only(
    tiny_resolved: ResolvedModel, tmp_path: Path
) -> None:
    from edge_agent.training._forward import wants_checkpointing
    from edge_agent.training.lora import LoraSpec, attach_lora

    spec = LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj",))
    for quant, default in (("nf4", True), ("int8", True), ("bf16", False), ("fp32", False)):
        base, _ = load_base(tiny_resolved, quant, device="cpu", cache_dir=tmp_path)
        assert wants_checkpointing(base, None) is default, quant
        peft_model = attach_lora(base, spec, init_seed=0)
        assert wants_checkpointing(peft_model, None) is default, quant
        assert wants_checkpointing(peft_model, not default) is (not default)
