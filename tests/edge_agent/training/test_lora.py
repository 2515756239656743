"""LoRA: seeded initialisation every machine reproduces, adapter state in and out, peft interop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.lora import (
    LoraSpec,
    adapter_config_dict,
    attach_lora,
    get_adapter_state,
    init_lora_state,
    set_adapter_state,
)
from protocol import randomness

SPEC = LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"


def fresh(resolved: ResolvedModel, quant: str = "fp32") -> Any:
    model, _ = load_base(resolved, quant, device="cpu")  # type: ignore[arg-type]
    return model


def tokens(n: int = 12) -> torch.Tensor:
    return torch.arange(100, 100 + 2 * n).reshape(2, n) * 37 % 49152


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def test_same_seed_is_bit_identical_and_follows_the_spec(tiny_resolved: ResolvedModel) -> None:
    a = get_adapter_state(attach_lora(fresh(tiny_resolved), SPEC, init_seed=7))
    b = get_adapter_state(attach_lora(fresh(tiny_resolved), SPEC, init_seed=7))
    assert sorted(a) == sorted(b)
    assert len(a) == 8  # 2 layers x (q, v) x (A, B)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a[f"{Q0}.lora_A.weight"].shape == (4, 64)
    assert a[f"{V1}.lora_B.weight"].shape == (32, 4)
    # lora_A = (2u - 1) / sqrt(in_features), u from the shared generator keyed by the name.
    name = f"{V1}.lora_A.weight"
    u = randomness.uniform(randomness.stream_key(7, name), 4 * 64)
    expected = ((2 * u - 1) / 8.0).astype(np.float32).reshape(4, 64)
    assert np.array_equal(a[name].numpy(), expected)
    assert a[name].abs().max() <= 1 / math.sqrt(64)
    assert a[name].std() == pytest.approx(1 / 8 / math.sqrt(3), rel=0.15)
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)


def test_different_seeds_differ(tiny_resolved: ResolvedModel) -> None:
    model = fresh(tiny_resolved)
    s7, s8 = init_lora_state(model, SPEC, 7), init_lora_state(model, SPEC, 8)
    for key in s7:
        if "lora_A" in key:
            assert not torch.equal(s7[key], s8[key])
    # Tensors with the same shape but other names also get their own values.
    assert not torch.equal(s7[f"{Q0}.lora_A.weight"], s7[f"{Q0.replace('0', '1')}.lora_A.weight"])


def test_init_state_is_the_same_from_plain_peft_and_quantized_models(
    tiny_resolved: ResolvedModel,
) -> None:
    spec = LoraSpec(
        r=4,
        alpha=8.0,
        dropout=0.1,
        target_modules=("q_proj", "v_proj", "down_proj"),
        rank_pattern={"layers.1.self_attn.q_proj": 2},
    )
    plain = init_lora_state(fresh(tiny_resolved), spec, 3)
    peft_model = attach_lora(fresh(tiny_resolved), spec, init_seed=3)
    attached = get_adapter_state(peft_model)
    from_peft = init_lora_state(peft_model, spec, 3)
    nf4 = get_adapter_state(attach_lora(fresh(tiny_resolved, "nf4"), spec, init_seed=3))
    for other in (attached, from_peft, nf4):
        assert sorted(other) == sorted(plain)
        assert all(torch.equal(plain[k], other[k]) for k in plain)
    assert plain[f"{Q0.replace('0', '1')}.lora_A.weight"].shape == (2, 64)  # rank_pattern
    assert plain[f"{Q0}.lora_A.weight"].shape == (4, 64)
    assert plain["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)


def test_seed_out_of_range_is_a_config_error(tiny_resolved: ResolvedModel) -> None:
    model = fresh(tiny_resolved)
    for seed in (-1, 2**64):
        with pytest.raises(ConfigError, match="init_seed must be an integer"):
            init_lora_state(model, SPEC, seed)
    assert len(init_lora_state(model, SPEC, 2**64 - 1)) == 8


def test_attach_starts_at_the_base_model_and_trains_only_the_adapter(
    tiny_resolved: ResolvedModel,
) -> None:
    model = fresh(tiny_resolved)
    before = logits(model)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    peft_model = attach_lora(model, SPEC, init_seed=1)
    assert torch.equal(torch.rand(3), expected_draw)  # torch's RNG untouched
    assert torch.equal(logits(peft_model), before)  # B = 0
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(".lora_" in n for n in trainable)
    with pytest.raises(ModelError, match="already carries"):
        attach_lora(peft_model, SPEC, init_seed=1)


def test_adapter_state_is_a_detached_float32_cpu_copy(tiny_resolved: ResolvedModel) -> None:
    peft_model = attach_lora(fresh(tiny_resolved, "bf16"), SPEC, init_seed=1)
    state = get_adapter_state(peft_model)
    key = f"{Q0}.lora_A.weight"
    assert all(
        v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous()
        for v in state.values()
    )
    assert not any(v.requires_grad for v in state.values())
    state[key].zero_()
    assert get_adapter_state(peft_model)[key].abs().sum() > 0


def test_set_adapter_state_loads_and_refuses_what_does_not_fit(
    tiny_resolved: ResolvedModel,
) -> None:
    peft_model = attach_lora(fresh(tiny_resolved), SPEC, init_seed=1)
    new = {k: torch.full_like(v, 0.25) for k, v in get_adapter_state(peft_model).items()}
    set_adapter_state(peft_model, new)
    assert all(torch.equal(v, new[k]) for k, v in get_adapter_state(peft_model).items())

    extra = dict(new, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(ModelError, match="unexpected keys base_model.model.lm_head"):
        set_adapter_state(peft_model, extra)
    missing = {k: v for k, v in new.items() if k != f"{V1}.lora_B.weight"}
    with pytest.raises(ModelError, match=r"missing keys .*layers\.1\.self_attn\.v_proj\.lora_B"):
        set_adapter_state(peft_model, missing)
    wrong = dict(new, **{f"{Q0}.lora_A.weight": torch.zeros(8, 64)})
    with pytest.raises(ModelError, match=r"q_proj.lora_A.weight has shape \[8, 64\], expected"):
        set_adapter_state(peft_model, wrong)
    # Refused states leave the adapter as it was.
    assert all(torch.equal(v, new[k]) for k, v in get_adapter_state(peft_model).items())


def test_stock_peft_loads_an_adapter_written_from_our_state(
    tiny_resolved: ResolvedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    spec = LoraSpec(
        r=4,
        alpha=16.0,
        dropout=0.0,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
        rank_pattern={"layers.0.mlp.up_proj": 2},
    )
    ours = attach_lora(fresh(tiny_resolved), spec, init_seed=5)
    base_logits = logits(ours)
    gen = torch.Generator().manual_seed(0)
    trained = {
        k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in get_adapter_state(ours).items()
    }
    set_adapter_state(ours, trained)
    ours_logits = logits(ours)
    assert (ours_logits - base_logits).abs().max() > 0.01  # the adapter changes the output

    out = tmp_path / "adapter"
    out.mkdir()
    save_file(get_adapter_state(ours), str(out / "adapter_model.safetensors"))
    config = adapter_config_dict(spec, str(tiny_model_dir))
    (out / "adapter_config.json").write_text(json.dumps(config))
    stock = PeftModel.from_pretrained(fresh(tiny_resolved), str(out))
    torch.testing.assert_close(logits(stock), ours_logits, rtol=0, atol=1e-6)


def test_adapter_config_dict_is_plain_json_peft_understands() -> None:
    from peft import LoraConfig

    spec = LoraSpec(r=8, alpha=16.0, dropout=0.05, target_modules=("v_proj", "q_proj"))
    data = adapter_config_dict(spec, "smollm2-135m")
    assert json.loads(json.dumps(data)) == data
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert (data["r"], data["lora_alpha"], data["lora_dropout"]) == (8, 16.0, 0.05)
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert data["base_model_name_or_path"] == "smollm2-135m"
    assert data["rank_pattern"] == {} and data["bias"] == "none"
    assert LoraConfig.from_peft_type(**data).r == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": -1.0}, "alpha must be positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": ()}, "target_modules must be non-empty"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive"),
        ({"layers": (1, -1)}, "layers must be non-negative integers"),
    ],
)
def test_invalid_spec_is_a_config_error(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ("q_proj",),
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        LoraSpec(**fields)


def test_spec_is_frozen_and_hashable() -> None:
    pattern = {"q_proj": 2}
    spec = LoraSpec(4, 8.0, 0.0, ("q_proj",), pattern)
    pattern["q_proj"] = 3  # the caller's dict is copied
    assert spec.rank_pattern == {"q_proj": 2}
    assert hash(spec) == hash(LoraSpec(4, 8.0, 0.0, ("q_proj",), {"q_proj": 2}))
    with pytest.raises(TypeError):
        spec.rank_pattern["q_proj"] = 5  # type: ignore[index]


def test_layers_limit_the_adapter_to_those_decoder_layers(
    tiny_resolved: ResolvedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``layers=(1,)``: LoRA on layer 1 of the 2-layer model only, seeded as without ``layers``,
    and stock peft loads it from the adapter config (``layers_to_transform``)."""
    from peft import PeftModel

    spec = LoraSpec(4, 8.0, 0.0, ("q_proj", "v_proj"), layers=(1,))
    ours = attach_lora(fresh(tiny_resolved), spec, init_seed=7)
    state = get_adapter_state(ours)
    assert sorted(state) == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ]
    every = init_lora_state(fresh(tiny_resolved), SPEC, 7)
    assert all(torch.equal(v, every[k]) for k, v in state.items())  # same seeded values
    assert init_lora_state(fresh(tiny_resolved), spec, 7).keys() == state.keys()
    gen = torch.Generator().manual_seed(1)
    set_adapter_state(ours, {k: torch.randn(v.shape, generator=gen) for k, v in state.items()})
    out = tmp_path / "adapter"
    out.mkdir()
    save_file(get_adapter_state(ours), str(out / "adapter_model.safetensors"))
    config = adapter_config_dict(spec, str(tiny_model_dir))
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    (out / "adapter_config.json").write_text(json.dumps(config))
    stock = PeftModel.from_pretrained(fresh(tiny_resolved), str(out))
    assert {n for n, _ in stock.named_parameters() if "lora_" in n} == {
        n for n, _ in ours.named_parameters() if "lora_" in n
    }
    torch.testing.assert_close(logits(stock), logits(ours), rtol=0, atol=1e-6)
