"""What a SLoRA stage-1 upload weighs against a LoRA adapter, and the density where they cross.

A stage-1 ``masked`` payload carries 4 bytes per masked entry (no indices: the mask is seeded),
``density × Σ numel`` entries over the sparse targets; a LoRA adapter carries
``4 · r · Σ (in + out)`` bytes over the LoRA targets. Both also carry a safetensors header
(names, offsets, shapes), a few bytes per tensor, left out here. The break-even density is
where the two data sizes are equal::

    d* = r · Σ_lora (in + out) / Σ_sparse (in · out)

Below ``d*`` a stage-1 round moves fewer bytes than a LoRA round. For a square ``h × h`` weight
it is ``2r / h``, so it falls as models grow: with stage 1 over every linear layer and LoRA on
q, k, v, o at r = 8 it is 0.87% for SmolLM2-135M and 0.13% for LLaMA-7B (both tested).
"""

from __future__ import annotations

from collections.abc import Mapping

Shapes = Mapping[str, tuple[int, int]]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_shapes(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    head_dim: int | None = None,
) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every linear weight of a Llama model's decoder blocks, named as
    in ``named_parameters()`` (``model.layers.{i}.self_attn.q_proj.weight``, ...)."""
    head_dim = head_dim or hidden // heads
    kv = (kv_heads or heads) * head_dim
    q = heads * head_dim
    per_layer = {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return {
        f"model.layers.{i}.{m}.weight": shape
        for i in range(layers)
        for m, shape in per_layer.items()
    }


def select(shapes: Shapes, target_modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The weights of ``shapes`` whose module matches a target (peft's rule)."""
    out = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if any(module == t or module.endswith("." + t) for t in target_modules):
            out[name] = shape
    return out


def sparse_bytes(shapes: Shapes, density: float, bytes_per_value: int = 4) -> float:
    """Expected data bytes of a stage-1 payload (the mask keeps ``density`` of each weight)."""
    return bytes_per_value * density * sum(o * i for o, i in shapes.values())


def lora_bytes(shapes: Shapes, r: int, bytes_per_value: int = 4) -> int:
    """Data bytes of a LoRA adapter of rank ``r`` on these weights (``A [r, in]``, ``B [out, r]``)."""
    return bytes_per_value * r * sum(o + i for o, i in shapes.values())


def break_even_density(sparse: Shapes, lora: Shapes, r: int) -> float:
    """The density at which a stage-1 payload over ``sparse`` weighs what a rank-``r`` adapter
    over ``lora`` does (data bytes; above it, stage 1 costs more per round)."""
    dense = sum(o * i for o, i in sparse.values())
    if dense == 0:
        raise ValueError("no sparse target weights")
    return r * sum(o + i for o, i in lora.values()) / dense
