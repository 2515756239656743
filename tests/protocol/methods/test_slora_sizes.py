"""SLoRA's byte arithmetic: stage-1 values against a LoRA adapter, and the break-even density."""

from __future__ import annotations

import pytest

from protocol.methods.slora.sizes import (
    ATTENTION,
    MLP,
    break_even_density,
    llama_shapes,
    lora_bytes,
    select,
    sparse_bytes,
)

SMOLLM2_135M = llama_shapes(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3)
LLAMA_7B = llama_shapes(hidden=4096, intermediate=11008, layers=32, heads=32)


def test_smollm2_shapes_match_its_checkpoint() -> None:
    attn = select(SMOLLM2_135M, ATTENTION)
    assert len(attn) == 120 and len(SMOLLM2_135M) == 210
    assert SMOLLM2_135M["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert SMOLLM2_135M["model.layers.29.mlp.down_proj.weight"] == (576, 1536)
    # the attention entries the stage-1 table of docs/methods/slora.md counts
    assert sum(o * i for o, i in attn.values()) == 26_542_080
    # LoRA r = 8 on q, k, v, o: the 3,686,400 data bytes of the docs' stage-2 payload
    assert lora_bytes(attn, 8) == 3_686_400


def test_break_even_density_smollm2_and_llama7b() -> None:
    """Stage 1 over every linear layer, LoRA r = 8 on q, k, v, o (FedIT's default)."""
    d_small = break_even_density(SMOLLM2_135M, select(SMOLLM2_135M, ATTENTION), 8)
    d_7b = break_even_density(LLAMA_7B, select(LLAMA_7B, ATTENTION), 8)
    assert d_small == pytest.approx(0.008681, abs=1e-6)  # 0.87%
    assert d_7b == pytest.approx(0.001295, abs=1e-6)  # 0.13%
    # at the break-even both payloads carry the same data bytes
    lora = lora_bytes(select(LLAMA_7B, ATTENTION), 8)
    assert sparse_bytes(LLAMA_7B, d_7b) == pytest.approx(lora)
    # the figure: at 1% and attention-only stage 1, LLaMA-7B's upload is 2.56x LoRA's
    attn = select(LLAMA_7B, ATTENTION)
    assert sparse_bytes(attn, 0.01) / lora_bytes(attn, 8) == pytest.approx(2.56)
    # LoRA on all seven linear layers moves the break-even up (0.31% on LLaMA-7B)
    d_all = break_even_density(LLAMA_7B, select(LLAMA_7B, ATTENTION + MLP), 8)
    assert d_all == pytest.approx(0.003086, abs=1e-6)


def test_break_even_needs_sparse_targets() -> None:
    with pytest.raises(ValueError, match="no sparse target"):
        break_even_density({}, SMOLLM2_135M, 8)
