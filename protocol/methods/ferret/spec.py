"""Ferret: full-parameter first-order updates that travel as (group, seed, coefficient) triples.

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models" (2024).
Agents take T SGD steps on every parameter of an unquantized base, project the update of each
parameter group on a few seeded random bases and send the coefficients only; the aggregator
averages the coefficients, rebuilds the global step from the same seeds, applies it, and sends
the averaged coefficients (not weights) back, so every agent rebuilds the same step itself.

**Parameter groups** (:func:`protocol.methods.ferret.math.build_layout`). The model's parameter
names (``named_parameters()``, tied weights once) in natural order (``layers.2`` before
``layers.10``), packed as the reference packs them: a tensor joins the open group unless that
takes it past ``int(0.9 * median numel)``. Large matrices are alone, norms are packed. Group
``g``'s name is ``<first member name>#<member count>``; its flat vector is its members
flattened row-major and concatenated; ``d_g`` is its length. The server sends
``ferret.layout`` (sha256 of the layout) and an agent whose model gives another layout refuses
the task.

**Seeds and bases** (shared randomness v1, ``spec/randomness.md``). Round ``r`` draws from the
pool of seed indices ``0 .. K-1`` with the base seed ``B_r = key(ferret.seed, 0)``: one pool
for the whole run, the same every round (the paper's rule: a fixed shared random subspace; a
fresh pool per round, ``key(ferret.seed, r)``, was an option until it measured no better).
The basis of seed index ``s`` for group ``g`` in round ``r`` is ``v = r_{s,g} / sqrt(d_g)``
with::

    key_{r,s,g} = key(key(B_r, s), fnv1a64(name of g))      # = stream_key(key(B_r, s), name)
    r_{s,g}[i]  = rademacher(key_{r,s,g}, i),  i = 0 .. d_g - 1

so ``|v| = 1`` and ``E[v vᵀ] = I / d_g``.

**Projection** (agent). With ``Δ_g`` the group's local update (after − before),
``n_g = min(K, max(floor(K · |Δ_g| / max_h |Δ_h|), 2))`` distinct seed indices are drawn (numpy
``default_rng(agent_seed(seed, r, agent id, "choose"))``; the batch order is seeded
``agent_seed(seed, r, agent id, "sgd<train.seed>")``, see ``_ferret_math.agent_seed``), and
for each ``γ = (d_g / n_g) · <Δ_g, v>`` (the reference's scaling). Then
``E[Σ_s γ_s v_s] = Δ_g``: the reconstruction is unbiased (the reference's truncated-normal
bases bounded by ``1/sqrt(d)`` have variance ``≈ 1/(3d)`` and give ``Δ/3`` on average, which
its server learning rate of 10 absorbs; ours needs 1).

**Aggregation and the global step** (server, and every agent again).
``γ̄_{g,s} = Σ_a w_a γ_{a,g,s} / Σ_a w_a`` (``w_a`` = the agent's examples; an agent that did
not pick ``(g, s)`` adds 0), rounded to float32. Each term is clipped as the reference clips
it, ``γ ← γ · min(1, clip_norm / (|γ v| + 1e-8))`` with ``|γ v| = |γ|``, and the step
``θ_g ← θ_g + Σ_s c_s r_{s,g}`` with ``c_s = float32(η_r · γ_clipped / sqrt(d_g))``,
``η_r`` the round's server learning rate (:func:`server_lr_at`),
terms in ascending seed order accumulated in float32 from 0, then added to the weights once.
The weights are held in ``ferret.dtype`` (fp32 or bf16) on both sides and stay bit-identical.

Wire:

- ``TaskAssign(kind="train", round=r)``: :class:`Params`, plus what brings the agent to the
  global model of round ``r - 1``: blobs ``step-<rr>`` (zero-padded to 6 digits), one
  ``seedcoef`` payload per missed round ``rr`` (the aggregated triples of that round, payload
  round ``rr``, ``base_seed = B_rr``, ``k = K``, ``n_groups`` = the group count), or, when the
  agent is more than ``ferret.max_catchup`` rounds behind, blob ``global``: a ``dense`` payload
  of every parameter (payload round = the global round it holds). Round 1 carries nothing:
  everyone starts from the base, whose hash the task names.
- ``TaskResult`` of a train task: blob ``update``, a ``seedcoef`` payload of round ``r`` with
  ``base_seed = B_r``: 12 bytes per triple (int32 group, int32 seed index, float32 γ) plus the
  safetensors header. Metrics ``held_round`` (the global round the agent trained from);
  ``out_of_sync = 1`` with zero examples and no triples when it could not reach round
  ``r - 1`` from what it was sent (the server then sends from ``held_round``).
- ``TaskAssign(kind="eval", round=r)``: the same catch-up blobs up to round ``r``; its result
  has metrics ``eval_loss``, ``eval_em`` and no blob.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from protocol.methods._common import AggregationParams, EvalParams, StrictParams, TrainParams

NAME = "ferret"
UPDATE_BLOB = "update"
GLOBAL_BLOB = "global"
STEP_PREFIX = "step-"
HELD_ROUND = "held_round"
OUT_OF_SYNC = "out_of_sync"

DEFAULT_K = 256
"""Seed pool size. The one-round probe on SmolLM2-135M (``benchmarks/ferret_k.py --probe``):
the rebuilt step gives 99.5% of the true update's loss drop at K = 256, 93% at K = 32. Cost per
round on each side is up to K x parameters random signs, linear in K, memory flat (SmolLM2 at
K = 256: ~1.3e10 signs, ~40 s on one quiet core). Over 3 rounds of the scoreboard (Natural
Instructions, 3 seeds): K = 2048 no better than 256 in Rouge-L or eval loss, for 8x the bytes;
K = 32 level in Rouge-L, its eval loss higher on every seed. See ``docs/methods/ferret.md``."""

MAX_CATCHUP = 63
"""More step blobs than this would not fit a message (64 blobs at most)."""


def step_blob(round: int) -> str:
    """Name of the blob carrying the aggregated triples of ``round``."""
    return f"{STEP_PREFIX}{round:06d}"


def step_round(blob: str) -> int | None:
    """The round of a ``step-<round>`` blob name, else ``None``."""
    if not blob.startswith(STEP_PREFIX):
        return None
    digits = blob[len(STEP_PREFIX) :]
    return int(digits) if digits.isdecimal() and len(digits) <= 10 else None


class FerretParams(StrictParams):
    k: Annotated[int, Field(ge=2, le=1 << 20)] = DEFAULT_K
    """Seed pool size K."""
    server_lr: Annotated[float, Field(gt=0, le=100)] = 1.0
    """Applied to the reconstructed step; with ``anneal = linear``, round 1's value. The
    reference's ``slr_max = 10`` with its bases that give Δ/3 is ``10 / 3`` here; measured on
    the scoreboard (3 seeds, 3 rounds), that schedule's global model was worse after rounds 1
    and 2 on every seed and level after the last, so the constant 1 (unbiased) is the default
    (``docs/methods/ferret.md``)."""
    anneal: Literal["none", "linear"] = "none"
    """``linear``: the reference's schedule, round ``r`` of ``R`` applies
    ``server_lr_min + (server_lr - server_lr_min) · (1 - (r - 1) / R)``."""
    server_lr_min: Annotated[float, Field(ge=0, le=100)] = 0.0
    rounds: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """R of the linear schedule; left out, the server sets the run's round count."""
    clip_norm: Annotated[float, Field(gt=0, le=1e6)] = 10.0
    """Per-term clip of ``|γ v|`` (the reference's ``max_norm``)."""
    seed: Annotated[int, Field(ge=0, lt=2**64)] = 0
    """Base of the seed pool: ``B = key(seed, 0)``, and of
    each agent's seed choice and batch order (with its agent id and the round). Left out, the
    server sets it to the run's seed (``run.seed``)."""
    basis: Literal["rademacher"] = "rademacher"
    dtype: Literal["fp32", "bf16"] = "fp32"
    """What the weights are held and trained in (both sides). A task quantized nf4/int8 still
    runs Ferret in this dtype: Ferret needs an unquantized base."""
    max_catchup: Annotated[int, Field(ge=0, le=MAX_CATCHUP)] = 16
    """Rounds of steps sent to an agent that missed some; beyond that it gets dense weights."""
    layout: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    """sha256 of the parameter groups, set by the server; agents check theirs against it."""


def server_lr_at(p: FerretParams, round: int) -> float:
    """The server learning rate of ``round`` (plain float64 arithmetic: the same everywhere)."""
    if p.anneal == "none":
        return p.server_lr
    if p.rounds is None:
        raise ValueError("ferret.anneal = linear needs ferret.rounds (the run's round count)")
    return p.server_lr_min + (p.server_lr - p.server_lr_min) * (1.0 - (round - 1) / p.rounds)


class Params(StrictParams):
    train: TrainParams = TrainParams(lr=0.01, grad_clip=1.0)
    eval: EvalParams = EvalParams()
    ferret: FerretParams = FerretParams()
    aggregation: AggregationParams = AggregationParams()
    """How the server combines the agents' coefficients: ``rule`` (the weighted mean, or the
    coordinate-wise median / trimmed mean over every (group, seed) coefficient, 0 where an agent
    sent none), ``max_weight`` and ``max_examples``. Its ``clip_norm`` does not apply: each
    received coefficient is clipped to ``ferret.clip_norm`` instead."""
