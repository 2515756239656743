"""A tiny randomly initialised model for the benchmarks' --quick modes (CI), built once per call."""

from __future__ import annotations

import tempfile
from pathlib import Path


def tiny_model(out: Path, layers: int = 2) -> Path:
    """A randomly initialised Llama (2 layers unless told) with the embedded model's tokenizer
    (for --quick)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edge_agent.model.store import DEFAULT_MODEL, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).path)
    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_model_dir(layers: int = 2) -> str:
    """A fresh tiny model directory (a temp dir) as a model spec string."""
    return str(tiny_model(Path(tempfile.mkdtemp(prefix="edgefed-tiny-")) / "model", layers))
