"""Parameter blocks shared by several methods' wire specs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ModuleName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.]+$")]


class StrictParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraParams(StrictParams):
    """The LoRA adapter every agent attaches (peft ``LoraConfig`` fields)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 8
    alpha: Annotated[float, Field(gt=0, le=4096)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[tuple[ModuleName, ...], Field(min_length=1, max_length=32)] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    )
    rank_pattern: Annotated[
        dict[ModuleName, Annotated[int, Field(ge=1, le=1024)]], Field(max_length=4096)
    ] = {}
    init_seed: Annotated[int, Field(ge=0, lt=2**64)] = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def peft_alpha(self) -> float:
        """peft's ``lora_alpha`` for these parameters."""
        return self.alpha

    @property
    def peft_rslora(self) -> bool:
        """peft's ``use_rslora``: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``."""
        return False

    def module_scaling(self, r: int) -> float:
        """peft's scaling of the ``B·A`` of a module of rank ``r`` under these parameters."""
        return self.peft_alpha / (r**0.5 if self.peft_rslora else r)


class TrainParams(StrictParams):
    """Local training hyperparameters."""

    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    lr: Annotated[float, Field(gt=0, le=10)] = 2e-4
    max_len: Annotated[int, Field(ge=8, le=32768)] = 128
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    grad_clip: Annotated[float, Field(gt=0, le=1e6)] | None = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: less agent memory, slower steps. None (the
    default): on where the base is quantized (NF4, int8), off otherwise."""


class EvalParams(StrictParams):
    """What an evaluation task measures."""

    max_len: Annotated[int, Field(ge=8, le=32768)] = 128
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    exact_match: bool = True
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 12
    max_examples: Annotated[int, Field(ge=1, le=1_000_000)] = 64


DEFAULT_CLIP_NORM = 1000.0
"""The default bound on one update's change of the model (see :class:`AggregationParams`)."""


class AggregationParams(StrictParams):
    """How the server combines updates; robust rules guard against poisoned updates.

    ``fedavg`` is the example-weighted mean, computed as a streaming sum. ``trimmed_mean`` and
    ``median`` are coordinate-wise and unweighted, and hold the round's updates in memory.
    ``clip_norm`` bounds each update's change of the model before it is combined (for LoRA the
    norm of ΔW = B·A − B₀·A₀ over all modules, not of the factors); it is on by default, at a
    bound far above an honest update's (it stops absurd ones, e.g. values of 1e30), and ``0``
    turns it off. ``max_weight`` caps the example count one update carries in the weighted mean.
    """

    rule: Literal["fedavg", "trimmed_mean", "median"] = "fedavg"
    trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    """Fraction trimmed at each end per coordinate (``trimmed_mean``)."""
    clip_norm: Annotated[float, Field(ge=0)] | None = DEFAULT_CLIP_NORM
    """Bound on each update's ΔW norm; 0 (or None) turns clipping off."""
    max_examples: Annotated[int, Field(ge=1, le=10**9)] = 10_000_000
    """An update claiming more examples than this is rejected."""
    max_weight: Annotated[int, Field(ge=1, le=10**9)] = 10_000
    """The most examples one update counts for in the weighted mean (a larger claim is capped
    to this, so no agent's claim alone decides the mean)."""

    @property
    def clip(self) -> float | None:
        """The bound in force (None: clipping is off)."""
        return self.clip_norm or None

    def weight(self, num_examples: int, *, region: bool = False) -> int:
        """The weight an update claiming ``num_examples`` carries (a regional tier's aggregate
        stands for many agents: its count is not capped)."""
        return num_examples if region else min(num_examples, self.max_weight)
