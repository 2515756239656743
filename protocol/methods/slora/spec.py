"""SLoRA (Babakniya et al., 2023): sparse fine-tuning under a seeded mask, then LoRA from its SVD.

Stage 1 (rounds ``1 .. sparse.stage1_rounds``). The trainable tensors are the base model's
dense weights of ``sparse.target_modules`` (default: every linear layer of a Llama block,
attention and MLP, as the paper's sparse fine-tuning covers the dense layers), named as in the
base model's ``named_parameters()`` (e.g. ``model.layers.0.self_attn.q_proj.weight``). The mask of a
tensor ``name`` with ``numel`` elements is, on both sides::

    protocol.randomness.mask_indices(stream_key(sparse.mask_seed, name), numel, sparse.density)

(flat row-major indices, ascending). Agents train only those entries, on an unquantized base
(the task's ``quant`` when it is ``bf16`` or ``fp32``, else ``fp32``: masked entries of an NF4 or
int8 weight cannot be trained).

- TaskAssign(kind="train"|"eval") carries :class:`Params` with ``stage = 1`` and, once a
  stage-1 round has been committed, the global sparse update in blob ``"global"``: a ``masked``
  payload (seed ``sparse.mask_seed``, density ``sparse.density``) whose values are
  ``W_global[mask] - W_base[mask]`` per tensor. Round 1 sends none (the update is zero).
- TaskResult(kind="train") carries blob ``"update"``: a ``masked`` payload of the agent's
  values ``W_agent[mask] - W_base[mask]`` (float32): exactly ``4 * sum(mask counts)`` data
  bytes plus the safetensors header (names, offsets, seed, density, full shapes), no indices.

Switch (on the server, when round ``stage1_rounds + 1`` begins: round ``stage1_rounds`` is
committed and evaluated as a sparse model first). For each target,
``ΔW = scatter(mask, values)``; with the SVD ``ΔW = U S Vᵀ`` truncated at rank ``r``::

    lora_B = U_r · sqrt(S_r) / sqrt(scaling)      lora_A = sqrt(S_r) · V_rᵀ / sqrt(scaling)

with ``scaling = lora.alpha / lora.r`` (peft's), so ``scaling · B · A`` is the best rank-r
approximation of ``ΔW``. The base goes back to the original weights. Every LoRA target must be
a sparse target (``lora.target_modules`` ⊆ ``sparse.target_modules``, checked); the stage-1
update of a sparse target that is no LoRA target is dropped at the switch. Under the ablation
``sparse.init = "random"`` every target gets FedIT's initialisation instead (seeded ``A``,
``B = 0``).

The first stage-2 round's train tasks carry ``switch_eval = true``: the agent evaluates the
global adapter it received (the switch's initialisation) before it trains and reports
``switch_eval_*`` metrics (see ``aggregator/methods/slora/switch.py``).

Stage 2 (later rounds): federated LoRA exactly as FedIT, from that initialisation: TaskAssign
carries ``stage = 2`` and the global adapter as a ``lora`` payload in blob ``"global"``
(peft names ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``); TaskResult carries the agent's adapter in blob ``"update"``; the agent's base
is quantized per the task's ``quant``.

Eval tasks evaluate the global model of the round (stage 1: base + sparse update; stage 2:
base + adapter) and return ``eval_loss``/``eval_em``, no blob.

Aggregation (``aggregation``, as FedIT's): ``fedavg`` (default), or the coordinate-wise
``median`` / ``trimmed_mean`` over the round's updates, in stage 1 over the masked values (the
masks are shared, so coordinate i is the same weight entry in every update), in stage 2 over
the LoRA factors. ``clip_norm`` bounds each update's change of the model before it is
combined: in stage 1 ``‖ΔW_agent − ΔW_global‖_F``, which is exactly the L2 norm of the
values' difference (an update beyond it is pulled toward the global along the straight line);
in stage 2 the norm of ``B·A − B₀·A₀`` as in FedIT.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.methods._common import (
    AggregationParams,
    EvalParams,
    LoraParams,
    ModuleName,
    StrictParams,
    TrainParams,
)

NAME = "slora"
GLOBAL_BLOB = "global"
UPDATE_BLOB = "update"

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama decoder block (attention and MLP); ``lm_head`` is not one."""

STAGE1_QUANTS = ("bf16", "fp32")
"""Quantizations stage 1 can train in; any other task quant trains stage 1 in fp32."""


def stage1_quant(task_quant: str) -> str:
    """The base quantization stage 1 runs on for a task whose ``quant`` is ``task_quant``."""
    return task_quant if task_quant in STAGE1_QUANTS else "fp32"


class SparseParams(StrictParams):
    """Stage 1: how long, how dense, which weights, which mask, how fast; how stage 2 starts."""

    stage1_rounds: Annotated[int, Field(ge=1, le=100_000)] = 2
    density: Annotated[float, Field(gt=0, le=1)] = 0.01
    """Share of each weight's entries trained in stage 1. Above the model's break-even
    density (``protocol.methods.slora.sizes.break_even_density``) a stage-1 upload is larger
    than the LoRA adapter: about 0.87% for SmolLM2-135M, 0.13% for LLaMA-7B at r = 8."""
    target_modules: Annotated[tuple[ModuleName, ...], Field(min_length=1, max_length=32)] = (
        LLAMA_LINEAR
    )
    """The dense layers stage 1 trains (peft's name-matching rule)."""
    mask_seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    """``None``: the server uses the run's seed and sends the value it chose."""
    lr: Annotated[float, Field(gt=0, le=10)] | None = None
    """Stage-1 learning rate; ``None``: ``train.lr × lr_scale``."""
    lr_scale: Annotated[float, Field(gt=0, le=1000)] = 10.0
    """Stage-1 rate as a multiple of ``train.lr`` when ``lr`` is unset. 1% of the entries
    move ~100× fewer parameters than dense fine-tuning, and at ``train.lr`` stage 1 learns
    too little for its SVD to be worth starting from (measured: docs/methods/slora.md)."""
    init: Literal["svd", "random"] = "svd"
    """Stage 2's start: ``svd`` (the paper: the SVD of the stage-1 update) or ``random``
    (ablation: FedIT's init after the same stage 1, isolating the data-driven init)."""

    def stage1_lr(self, train_lr: float) -> float:
        return self.lr if self.lr is not None else train_lr * self.lr_scale


class SloraLoraParams(LoraParams):
    """FedIT's block, with every linear layer as the default target: the switch keeps only the
    stage-1 update of LoRA targets, and with q, k, v, o alone it kept 40% of stage 1's eval
    gain against 75% with all seven (docs/methods/slora.md)."""

    target_modules: Annotated[tuple[ModuleName, ...], Field(min_length=1, max_length=32)] = (
        LLAMA_LINEAR
    )


class Params(StrictParams):
    lora: SloraLoraParams = SloraLoraParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    sparse: SparseParams = SparseParams()
    aggregation: AggregationParams = AggregationParams()
    stage: Literal[1, 2] = 1
    """Set by the server on every task: the stage the global model is in."""
    switch_eval: bool = False
    """Set by the server on the first stage-2 round's train tasks: evaluate the switch's
    adapter before training and report ``switch_eval_*``."""

    @model_validator(mode="after")
    def _one_rank(self) -> Params:
        if self.lora.rank_pattern:
            raise ValueError("slora uses one LoRA rank for every target: rank_pattern must be {}")
        untrained = sorted(set(self.lora.target_modules) - set(self.sparse.target_modules))
        if untrained:
            raise ValueError(
                f"LoRA targets {untrained} are not in sparse.target_modules: stage 2 starts "
                "from the stage-1 update of each LoRA target"
            )
        return self
