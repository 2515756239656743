"""FedPipe: importance-selected weights, per-agent ranks, batch and precision, mixed-rank FedAvg.

Fang et al., "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of Large
Language Models" (2024). Four parts, all server-driven:

1. **Importance and selection.** Before round 1 every agent runs a *score* task: per weight
   matrix ``W`` of the decoder's linear layers (``lora.target_modules``), the prior
   ``Σ_batches Σ_ij |W_ij · ∂L/∂W_ij|`` (divided by ``W.numel()`` when
   ``score.normalize = "mean"``) over ``score.batches`` batches of its own data. While it
   trains, it measures AdaLoRA's smoothed sensitivity of its adapters and reports it with each
   update. Every ``select.every`` rounds the server chooses each agent's matrices (its top
   ``select.count`` or ``select.fraction`` by its importance, or at random).
2. **Per-agent configuration.** For each training round the server solves, from each agent's
   profile and its fitted constants, the rank level (spread over its matrices by importance,
   ``plan.rank_spread``), the batch size and the base precision that minimise the slowest
   agent's estimated round time under its memory and a total-rank floor
   (``aggregator/methods/fedpipe/plan.py`` and ``solve.py``).
3. **Mixed-rank aggregation** in ``ΔW = c(r)·B·A`` space (``c(r)`` the module's scaling at its
   rank, :meth:`FedpipeLora.module_scaling`), weighted by examples over the
   agents that adapted each module; each agent is then sent the truncated SVD of the global
   ``ΔW`` at its own ranks.
4. **Precision by memory**: the planner's choice travels as ``TaskAssign.quant``.

Wire (tensor names are peft's: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``.lora_B.weight`` ``[out, r]``; ``<module>`` e.g. ``model.layers.3.mlp.up_proj``):

- ``TaskAssign(kind="score")``: :class:`Params`; no blob. Its ``TaskResult`` carries blob
  ``scores``, a ``dense`` payload of one float32 tensor of shape ``[1]`` per candidate matrix,
  named by its module (``model.layers.3.mlp.up_proj``), and metric ``tokens_mean`` (padded
  tokens per example in the scoring batches, which the server's time model uses);
  ``num_examples`` = examples scored.
- ``TaskAssign(kind="train", round=r)``: :class:`Params` with ``ranks`` = this agent's rank per
  selected module, ``train.batch_size`` / ``train.steps`` = its batch and step count; from
  round 2 on, blob ``global``: a ``lora`` payload with exactly those ranks, scaled so that
  ``c(r)·B·A`` is the best rank-r approximation of the global ``ΔW`` (components past
  the global's rank: seeded ``A`` rows, zero ``B`` columns). Round 1 carries none: every agent
  builds the seeded adapter of ``edge_agent.training.lora`` (``lora.init_seed``) at its ranks.
  ``TaskResult``: blob ``update``, a ``lora`` payload of the same names and shapes, and blob
  ``sensitivity``, a ``dense`` payload of one float32 ``[1]`` per adapted module (AdaLoRA's
  smoothed sensitivity times uncertainty of its adapter entries, mean over ``lora_A`` plus mean
  over ``lora_B``); metric ``memory_peak`` (bytes).
- ``TaskAssign(kind="eval", round=r)``: blob ``global``, the global ``ΔW`` of round ``r`` as
  exact LoRA factors (per module, rank = the global's rank, at most the sum of the round's
  ranks); the agent evaluates base + that adapter. Result: metrics only.

A regional tier (``Hello.role = "region"``) is planned no ranks: its score task is an agent's;
its train and eval tasks carry ``selected`` and, from round 2 on, the global as exact factors
(the eval task's blob). It answers a score task with its agents' example-weighted mean scores
and a train task with its agents' mean ``ΔW`` as exact factors of any rank up to
``min(out, in)`` per module (scaled like the global: ``c(R)·B·A``), ``num_examples`` = its
agents' total; the server folds that in like any update: ``Σ_R W_R·ΔW_R = Σ_a n_a·ΔW_a``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from protocol.methods._common import (
    AggregationParams,
    EvalParams,
    LoraParams,
    ModuleName,
    StrictParams,
    TrainParams,
)

NAME = "fedpipe"
GLOBAL_BLOB = "global"
UPDATE_BLOB = "update"
SCORE_BLOB = "scores"
SENSITIVITY_BLOB = "sensitivity"
TOKENS_MEAN = "tokens_mean"
MEMORY_PEAK = "memory_peak"

TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The decoder's linear layers: the candidates for adaptation."""

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "nf4")
"""Base precisions, most precise first (the planner prefers the earlier at equal time)."""

Rank = Annotated[int, Field(ge=1, le=1024)]
Precision = Literal["fp32", "bf16", "int8", "nf4"]


class FedpipeLora(LoraParams):
    """LoRA shape: ``r`` is the nominal rank ``r0`` (the capacity floor is counted in it);
    ranks are chosen per agent and per module. A module of rank ``r`` is scaled by
    ``alpha / r`` (peft's default) or, with ``rslora``, ``alpha / sqrt(r · r0)``."""

    target_modules: Annotated[tuple[ModuleName, ...], Field(min_length=1, max_length=32)] = TARGETS
    rslora: bool = False
    """Rank-stabilised scaling (Kalajdzievski 2023; peft ``use_rslora`` with ``lora_alpha =
    alpha / sqrt(r0)``): ``alpha / sqrt(r · r0)``, which equals ``alpha / r`` at the nominal rank
    ``r0`` and makes the size of Adam's first steps in ``ΔW`` independent of the rank (under
    ``alpha / r`` a rank-1 module moves about √r0 times faster than one at ``r0``). Off by
    default: on SmolLM2 it measured no better (docs/methods/fedpipe.md), and an absent field
    means ``alpha / r`` to agents and servers of either version."""

    @property
    def peft_alpha(self) -> float:
        return self.alpha / self.r**0.5 if self.rslora else self.alpha

    @property
    def peft_rslora(self) -> bool:
        return self.rslora

    @field_validator("rank_pattern")
    @classmethod
    def _no_pattern(cls, value: dict[str, int]) -> dict[str, int]:
        if value:
            raise ValueError("fedpipe chooses ranks per agent; leave rank_pattern empty")
        return value


class ScoreParams(StrictParams):
    """The importance pass each agent runs once, before round 1."""

    batches: Annotated[int, Field(ge=1, le=10_000)] = 4
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    max_len: Annotated[int, Field(ge=8, le=32768)] = 128
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    normalize: Literal["mean", "sum"] = "mean"
    """``mean``: the score of a matrix is per entry (big and small matrices compare fairly);
    ``sum``: the plain sum, which favours the big MLP matrices."""


class SelectParams(StrictParams):
    """Which matrices each agent adapts: ``count`` if given, else ``fraction`` of the
    candidates, chosen per agent by its importance and chosen again every ``every`` rounds."""

    fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    count: Annotated[int, Field(ge=1, le=100_000)] | None = None
    every: Annotated[int, Field(ge=1, le=1_000_000)] = 2
    """Rounds between selections: rounds 1, 1 + every, 1 + 2·every, … choose again."""
    per_agent: bool = True
    """Each agent adapts its own matrices at per-matrix ranks; false: every agent adapts the
    global selection (the top matrices by the example-weighted mean score), one rank per
    importance tier (``plan.tiers``), as a regional tier always plans its agents."""
    mode: Literal["importance", "random"] = "importance"
    """``importance``: each agent's most important matrices; ``random``: a seeded random set
    of the same size per agent and selection (an ablation: the ranks still follow importance)."""
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.85
    """AdaLoRA's smoothing of the sensitivity ``|w · ∂L/∂w|`` of the adapters' entries."""
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.85
    """AdaLoRA's smoothing of its uncertainty ``|I − Ī|``."""


def _sorted_unique(values: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(values)) != len(values):
        raise ValueError("values must be distinct")
    return tuple(sorted(values))


class PlanParams(StrictParams):
    """The per-agent configuration space and the constraints of the solve."""

    ranks: Annotated[tuple[Rank, ...], Field(min_length=1, max_length=16)] = (2, 4, 8, 16)
    batch_sizes: Annotated[
        tuple[Annotated[int, Field(ge=1, le=4096)], ...], Field(min_length=1, max_length=16)
    ] = (1, 2, 4, 8)
    quants: Annotated[tuple[Precision, ...], Field(min_length=1, max_length=4)] = (
        "bf16",
        "int8",
        "nf4",
    )
    tiers: Annotated[int, Field(ge=1, le=4)] = 2
    """Used by a regional tier's agents only (planned without per-agent importance): the
    selected matrices split into this many tiers, one rank per tier."""
    rank_spread: Annotated[float, Field(ge=0, le=4)] = 1.0
    """Per-weight ranks: an agent planned at rank level ``r`` gives matrix ``m`` the rank
    ``r · n · s_m^γ / Σ s^γ`` (rounded, within [1, max(ranks)]), ``s`` its importance,
    ``γ`` this value; 0 gives every selected matrix rank ``r``."""
    fit_time: bool = True
    """Fit each agent's step-time constants to its measured rounds (else the prior constants
    scaled by one learnt speed)."""
    fit_memory: bool = True
    """Scale each agent's modelled memory by its measured peak over the model (never below 1);
    off when the agents' memory is simulated (``--agent-limit``) rather than their own."""
    capacity: Annotated[float, Field(ge=0, le=64)] = 0.5
    """Floor on the round's total rank: ``Σ_agents Σ_modules rank >= capacity · agents ·
    modules · lora.r`` (relaxed, with a warning, when no configuration can meet it)."""
    memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of an agent's available memory the model of its need may use."""
    default_bandwidth_mbps: Annotated[float, Field(gt=0, le=1e6)] = 100.0
    """Used for an agent that has reported no bandwidth yet."""
    examples_per_round: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Examples each agent trains on per round (default ``train.steps · train.batch_size``);
    an agent with batch ``b`` runs ``ceil(examples_per_round / b)`` steps."""

    @field_validator("ranks", "batch_sizes")
    @classmethod
    def _grid(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return _sorted_unique(value)

    @field_validator("quants")
    @classmethod
    def _distinct_quants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("quants must be distinct")
        return value


class Params(StrictParams):
    lora: FedpipeLora = FedpipeLora()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    score: ScoreParams = ScoreParams()
    select: SelectParams = SelectParams()
    plan: PlanParams = PlanParams()
    max_examples: Annotated[int, Field(ge=1, le=10**9)] = 10_000_000
    """An update or score claiming more examples than this is rejected."""
    aggregation: AggregationParams = AggregationParams()
    """How updates are combined in ΔW space: ``rule`` (weighted mean, or coordinate-wise median
    / trimmed mean of the dense ΔW), ``clip_norm`` (on ‖ΔW_i − ΔW_global‖) and ``max_weight``;
    its ``max_examples`` is not used (the one above is)."""
    ranks: Annotated[dict[ModuleName, Rank], Field(max_length=4096)] = {}
    """Set by the server in each train task: this agent's rank per selected module."""
    selected: Annotated[tuple[ModuleName, ...], Field(max_length=4096)] = ()
    """Set by the server in a task for a regional tier (``Hello.role = "region"``): the selected
    modules, most important first. The tier plans its own agents' ranks over them; ``ranks`` is
    then empty."""

    @model_validator(mode="after")
    def _ranks_in_grid(self) -> Params:
        bad = sorted({r for r in self.ranks.values() if r > max(self.plan.ranks)})
        if bad:
            raise ValueError(f"ranks {bad} exceed the largest planned rank {max(self.plan.ranks)}")
        return self
