"""A tiny randomly initialised Llama saved as a Hugging Face directory, for fast real runs.

Its tokenizer is the embedded default model's (taken from the model store's converted cache,
which the first call creates), so chat templates and data rendering are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(target: Path, *, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edge_agent.model_store import DEFAULT_MODEL, resolve_model

    if (target / "config.json").exists():
        return target
    real = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(real.path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
