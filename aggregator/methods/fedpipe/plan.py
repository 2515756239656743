"""FedPipe's per-agent configuration problem: a time and memory model, and the plan types.

Each agent ``a`` gets one configuration ``c`` = (a LoRA rank per importance tier, a batch size,
a base precision). With ``P(c) = Σ_m r_tier(m)·(in_m + out_m)`` its LoRA parameters, ``E`` the
examples per round, ``L̄`` the agent's mean padded tokens per example (measured by its score
task), ``L̂ = train.max_len`` (the bound on any example) and ``G_q`` its measured matmul
throughput for precision ``q``::

    steps(c)   = ceil(E / b)
    step_s(c)  = (OVERHEAD_GFLOP[q] + KAPPA[q] · b · L̄ · (4·P_body + 6·P(c)) / 1e9) / (G_q·speed)
    bytes(c)   = 4·P(c) + PAYLOAD_HEADER                      (one adapter, each way)
    time(c)    = steps·step_s + 2·bytes·8 / (bandwidth_mbps·1e6) + 2·rtt
    memory(c)  = RUNTIME + base_q + 16·P(c) + ACT_PEAK · b · L̂ · ACT_TOKEN[dtype] · layers · hidden

``base_q = P_body·BYTES_LINEAR[q] + P_other·BYTES_OTHER[dtype]`` (bitsandbytes quantizes the
decoder's linears only; the rest is in the compute dtype), ``16·P`` = fp32 adapter, its gradient and AdamW's two moments.

The problem (:class:`Problem`): minimise the slowest agent's ``time`` subject to each
agent's memory and a floor on the total rank, then give agents off the critical path the
most rank and precision; :mod:`aggregator.methods.fedpipe.solve` solves it. What the
server keeps of a solution is an :class:`AgentPlan` per agent.

Constants: measured on the 2-core development box (no GPU), SmolLM2-135M-Instruct, LoRA r = 8
on all seven projections, demo data, one thread, in ``docs/methods/fedpipe.md`` with the
commands. They hold for CPUs; CUDA agents use the same ``KAPPA`` against their measured bf16
throughput, which was not measured here (no GPU).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Layout(Protocol):
    """What the planner needs of an agent's adapted matrices
    (:class:`aggregator.methods.fedpipe.importance.Layout`, which imports this module)."""

    def ranks(self, level: int) -> dict[str, int]: ...

    def size(self, level: int) -> tuple[int, int]: ...


PRECISION_LEVEL: Mapping[str, int] = {"nf4": 0, "int8": 1, "bf16": 2, "fp32": 3}
BYTES_LINEAR: Mapping[str, float] = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5625}
"""Bytes per decoder-linear parameter. Measured with ``model_store.base_param_bytes`` on
SmolLM2-135M: fp32 538,060,288 B, bf16 269,030,272, int8 219,555,328, nf4 173,120,128 for
106,168,320 linear and 28,346,688 other parameters (nf4: 4 bits + a float32 absmax per 64)."""
BYTES_OTHER: Mapping[str, float] = {"fp32": 4.0, "bf16": 2.0}
"""Bytes per embedding or norm parameter, by compute dtype: under int8/nf4 they stay
unquantized in the agent's compute dtype (bf16 where it has native bf16, else fp32; see
``edge_agent.model.loader.compute_dtype_name``)."""
ACT_TOKEN: Mapping[str, float] = {"fp32": 77.4, "bf16": 53.0}
"""Activation bytes saved for backward per token, per layer and unit of hidden size, by
compute dtype (``torch.autograd.graph.saved_tensors_hooks``, storages counted once, parameters
excluded; batch 4 × 53 tokens: 283,689,068 B in fp32, 194,340,732 B in bf16)."""
ACT_PEAK = 2.2
"""Peak working memory over saved activations: resident-set growth per token between batch
4 and 8 divided by the saved bytes per token (2.0 nf4, 2.2 bf16, 2.3 fp32)."""
RUNTIME_BYTES = 445_067_264
"""Resident set of an agent process after importing torch, transformers, peft, bitsandbytes."""
KAPPA: Mapping[str, float] = {"fp32": 1.86, "bf16": 1.47, "int8": 1.71, "nf4": 1.39}
"""Step time per token over the FLOP model at the profile's throughput (bf16 against the bf16
matmul figure, the others against fp32): the slope of a fit ``t = α + β·tokens`` to steps of
batch 1, 4 and 8. NF4/int8 dequantize every weight on every step whatever the batch, so
their slope is lower than fp32's and their fixed cost (below) higher."""
OVERHEAD_GFLOP: Mapping[str, float] = {"fp32": 23.0, "bf16": 41.0, "int8": 52.0, "nf4": 88.0}
"""The fit's fixed cost per step ``α``, in GFLOP at the same throughput."""
PAYLOAD_HEADER = 4096
"""Safetensors header and message framing of one LoRA payload (measured 1.8-5.7 KB)."""
FALLBACK_GFLOPS = 10.0
"""Throughput assumed for an agent whose profile reports none (``--no-measure``)."""


class PlanError(ValueError):
    """The problem has no solution (or is too large for the exhaustive solver)."""


@dataclass(frozen=True)
class Module:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the model costs: parameters of the decoder's linears (quantizable, run for every
    token), the rest (embeddings, norms, an untied LM head), layers and hidden size."""

    body_params: int
    other_params: int
    layers: int
    hidden: int

    def base_bytes(self, quant: str, dtype: str) -> float:
        """Bytes of the base in ``quant`` with its unquantized rest in ``dtype``."""
        return self.body_params * BYTES_LINEAR[quant] + self.other_params * BYTES_OTHER[dtype]


@dataclass(frozen=True)
class Resources:
    """One agent as the model sees it."""

    gflops_fp32: float
    gflops_bf16: float
    memory_bytes: float
    bandwidth_mbps: float
    rtt_ms: float = 0.0
    gpu: bool = False
    tokens_mean: float = 128.0
    speed: float = 1.0
    """Measured step times over the model's, from earlier rounds (1: none yet)."""
    time_fit: tuple[float, float] | None = None
    """The agent's fitted ``(u, v)`` (:mod:`aggregator.methods.fedpipe.fit`): step time
    ``u·f₁ + v·f₂``; when None, ``u = v = 1 / speed``."""
    memory_factor: float = 1.0
    """Measured over modelled peak memory (>= 1), from earlier rounds."""

    def gflops(self, quant: str) -> float:
        return self.raw_gflops(quant) * self.speed

    def raw_gflops(self, quant: str) -> float:
        """The profile's throughput for ``quant`` (not scaled by ``speed``)."""
        bf16 = self.gpu or quant == "bf16"
        value = self.gflops_bf16 if bf16 and self.gflops_bf16 > 0 else self.gflops_fp32
        return value if value > 0 else FALLBACK_GFLOPS

    def factors(self) -> tuple[float, float]:
        """``(u, v)`` of the step time ``u·f₁ + v·f₂``."""
        return self.time_fit if self.time_fit is not None else (1 / self.speed, 1 / self.speed)

    def compute_dtype(self, quant: str) -> str:
        """What the agent computes in: NF4 and int8 in bf16 where bf16 is native (a GPU, or a
        CPU whose measured bf16 matmul is not slower than fp32: AVX512-BF16/AMX), as the
        agent's loader chooses."""
        if quant == "bf16":
            return "bf16"
        if quant in ("nf4", "int8") and (self.gpu or self.gflops_bf16 >= self.gflops_fp32 > 0):
            return "bf16"
        return "fp32"


@dataclass(frozen=True)
class Config:
    tier_ranks: tuple[int, ...]
    batch: int
    quant: str


@dataclass(frozen=True)
class Options:
    ranks: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    quants: tuple[str, ...]
    examples_per_round: int
    max_len: int = 128
    capacity_floor: float = 0.0
    memory_fraction: float = 0.9


@dataclass(frozen=True)
class Estimate:
    seconds: float
    memory_bytes: float
    capacity: int
    lora_params: int
    payload_bytes: int
    steps: int
    compute_s: float
    overhead_s: float = 0.0
    """``f₁``: the fixed cost per step at the profiled throughput (unscaled)."""
    flop_s: float = 0.0
    """``f₂``: the per-token cost of one step at the profiled throughput (unscaled)."""


@dataclass(frozen=True)
class Problem:
    """Selected modules split into tiers (tier 0 = most important), the model, the agents.

    An agent with a :class:`~aggregator.methods.fedpipe.importance.Layout` in ``layouts`` has
    its own adapted matrices: its configurations' ``tier_ranks`` is then one rank level
    (``tiers`` has one tier) and the layout gives each matrix its rank."""

    tiers: tuple[tuple[Module, ...], ...]
    shape: ModelShape
    agents: Mapping[str, Resources]
    options: Options
    layouts: Mapping[str, Layout] = field(default_factory=dict)

    def configs(self) -> list[Config]:
        """Every configuration: one rank per tier, never larger than a more important tier's."""
        o = self.options
        rank_sets = [
            t
            for t in itertools.product(sorted(o.ranks, reverse=True), repeat=len(self.tiers))
            if all(a >= b for a, b in itertools.pairwise(t))
        ]
        return [Config(r, b, q) for r in rank_sets for b in o.batch_sizes for q in o.quants]

    def estimate(self, agent: str, c: Config) -> Estimate:
        res, shape, o = self.agents[agent], self.shape, self.options
        layout = self.layouts.get(agent)
        if layout is not None:
            lora, capacity = layout.size(c.tier_ranks[0])
        else:
            lora = sum(
                r * sum(m.in_features + m.out_features for m in tier)
                for r, tier in zip(c.tier_ranks, self.tiers, strict=True)
            )
            capacity = sum(r * len(tier) for r, tier in zip(c.tier_ranks, self.tiers, strict=True))
        steps = math.ceil(o.examples_per_round / c.batch)
        flops = KAPPA[c.quant] * c.batch * res.tokens_mean * (4 * shape.body_params + 6 * lora)
        g = res.raw_gflops(c.quant)
        f1, f2 = OVERHEAD_GFLOP[c.quant] / g, flops / 1e9 / g
        u, v = res.factors()
        step_s = u * f1 + v * f2
        payload = 4 * lora + PAYLOAD_HEADER
        comm_s = 2 * payload * 8 / (res.bandwidth_mbps * 1e6) + 2 * res.rtt_ms / 1000
        dtype = res.compute_dtype(c.quant)
        act = ACT_TOKEN[dtype] * shape.layers * shape.hidden
        memory = (
            RUNTIME_BYTES
            + shape.base_bytes(c.quant, dtype)
            + 16 * lora
            + ACT_PEAK * c.batch * o.max_len * act
        ) * res.memory_factor
        compute = steps * step_s
        return Estimate(compute + comm_s, memory, capacity, lora, payload, steps, compute, f1, f2)

    def fits(self, agent: str, c: Config) -> bool:
        limit = self.options.memory_fraction * self.agents[agent].memory_bytes
        return self.estimate(agent, c).memory_bytes <= limit


@dataclass
class Solution:
    choice: dict[str, Config]
    estimates: dict[str, Estimate]
    t_max: float
    value: float
    capacity_relaxed: bool = False
    solver: str = ""
    stats: dict[str, float] = field(default_factory=dict)


def split_tiers(ranked: Sequence[Module], tiers: int) -> tuple[tuple[Module, ...], ...]:
    """Modules in decreasing importance, cut into ``tiers`` nearly equal contiguous groups."""
    count = min(tiers, len(ranked))
    bounds = np.linspace(0, len(ranked), count + 1).round().astype(int)
    return tuple(tuple(ranked[bounds[i] : bounds[i + 1]]) for i in range(count))


def model_shape(model_dir: Path) -> tuple[ModelShape, dict[str, tuple[int, int]]]:
    """The cost shape of the model in ``model_dir`` and its decoder linears' ``(out, in)`` by
    weight name, from the safetensors headers and ``config.json`` (no tensor is read)."""
    body = other = 0
    linears: dict[str, tuple[int, int]] = {}
    layers: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PlanError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        with f.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 64 * 2**20:
                raise PlanError(f"{f}: safetensors header of {length} bytes is implausible")
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = [int(d) for d in entry["shape"]]
            numel = math.prod(shape)
            parts = name.split(".")
            if "layers" in parts and len(shape) == 2 and name.endswith(".weight"):
                body += numel
                linears[name] = (shape[0], shape[1])
                layers.add(parts[parts.index("layers") + 1])
            else:
                other += numel
    config = json.loads((Path(model_dir) / "config.json").read_text("utf-8"))
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    if not linears or hidden <= 0:
        raise PlanError(f"{model_dir}: no decoder layers or hidden size found")
    return ModelShape(body, other, len(layers), hidden), linears


def natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key for module names in layer order (``layers.2`` before ``layers.10``)."""
    return [(0, int(p)) if p.isdecimal() else (1, p) for p in re.split(r"([0-9]+)", name) if p]


# --- what the server keeps of a plan ----------------------------------------------------------


@dataclass(frozen=True)
class AgentPlan:
    """One agent's configuration for one round, as assigned (and saved for a restart).

    ``speed`` is the factor its profile's throughput was scaled by (learnt from its earlier
    rounds, see the server), ``compute_s`` the training part of ``seconds``."""

    quant: str
    batch: int
    steps: int
    tier_ranks: tuple[int, ...]
    seconds: float
    compute_s: float
    memory_bytes: float
    payload_bytes: int
    speed: float = 1.0
    ranks: Mapping[str, int] = field(default_factory=dict)
    """The rank of each adapted matrix (an agent planned with its own layout), else empty:
    the tiers' ranks apply."""
    overhead_s: float = 0.0
    flop_s: float = 0.0
    """``f₁``, ``f₂`` of the plan (:mod:`aggregator.methods.fedpipe.fit`)."""

    def module_ranks(self, tiers: Sequence[Sequence[str]]) -> dict[str, int]:
        if self.ranks:
            return dict(self.ranks)
        return {m: r for r, tier in zip(self.tier_ranks, tiers, strict=True) for m in tier}

    def details(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ranks:
            values = list(self.ranks.values())
            out["rank"] = f"{min(values)}-{max(values)}"
            out["rank_mean"] = f"{sum(values) / len(values):.1f}"
            out["matrices"] = str(len(values))
        else:
            out["rank"] = "/".join(str(r) for r in self.tier_ranks)
        return out | {
            "quant": self.quant,
            "batch": str(self.batch),
            "steps": str(self.steps),
            "est_s": f"{self.seconds:.1f}",
            "est_train_s": f"{self.compute_s:.1f}",
            "mem_MB": f"{self.memory_bytes / 1e6:.0f}",
        }

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.details().items())

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "tier_ranks": list(self.tier_ranks), "ranks": dict(self.ranks)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentPlan:
        try:
            return cls(
                str(data["quant"]),
                int(data["batch"]),
                int(data["steps"]),
                tuple(int(r) for r in data["tier_ranks"]),
                float(data["seconds"]),
                float(data["compute_s"]),
                float(data["memory_bytes"]),
                int(data["payload_bytes"]),
                float(data.get("speed", 1.0)),
                {str(m): int(r) for m, r in dict(data.get("ranks") or {}).items()},
                float(data.get("overhead_s", 0.0)),
                float(data.get("flop_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"a stored plan is malformed: {exc!r}") from None


def agent_plans(problem: Problem, solution: Solution) -> dict[str, AgentPlan]:
    out = {}
    for agent, c in solution.choice.items():
        e = solution.estimates[agent]
        out[agent] = AgentPlan(
            c.quant,
            c.batch,
            e.steps,
            c.tier_ranks,
            e.seconds,
            e.compute_s,
            e.memory_bytes,
            e.payload_bytes,
            problem.agents[agent].speed,
            problem.layouts[agent].ranks(c.tier_ranks[0]) if agent in problem.layouts else {},
            e.overhead_s,
            e.flop_s,
        )
    return out


# --- single-agent rules: admission, the precision of score and eval tasks --------------------


def resources(
    profile: Any,
    *,
    rtt_ms: float | None = None,
    bandwidth_mbps: float | None = None,
    default_bandwidth_mbps: float = 100.0,
    tokens: float = 128.0,
    speed: float = 1.0,
    time_fit: tuple[float, float] | None = None,
    memory_factor: float = 1.0,
) -> Resources:
    """An agent's :class:`Resources` from its ``protocol.messages.Profile`` and link figures
    (the latest heartbeat's, else the Hello's, else the default). On a GPU the memory is its
    largest free GPU memory, else the available RAM. ``speed`` scales the measured throughput
    (what the agent's earlier rounds taught)."""
    gpus = list(profile.gpus)
    memory = max(g.memory_free for g in gpus) if gpus else profile.ram_available
    bandwidth = bandwidth_mbps or profile.bandwidth_mbps or default_bandwidth_mbps
    rtt = rtt_ms if rtt_ms is not None else (profile.rtt_ms or 0.0)
    return Resources(
        gflops_fp32=float(profile.matmul_gflops_fp32),
        gflops_bf16=float(profile.matmul_gflops_bf16),
        memory_bytes=float(memory),
        bandwidth_mbps=float(bandwidth),
        rtt_ms=float(rtt),
        gpu=bool(gpus),
        tokens_mean=tokens,
        speed=speed,
        time_fit=time_fit,
        memory_factor=memory_factor,
    )


def _minimal(problem: Problem, batch: int | None = None) -> list[Config]:
    """The smallest rank in every tier and the smallest batch, in each allowed precision."""
    o = problem.options
    b = min(o.batch_sizes) if batch is None else batch
    return [Config((min(o.ranks),) * len(problem.tiers), b, q) for q in o.quants]


def refusal(problem: Problem, agent: str) -> str | None:
    """None if the agent's memory holds the smallest configuration, else why it cannot."""
    configs = _minimal(problem)
    if any(problem.fits(agent, c) for c in configs):
        return None
    c = min(configs, key=lambda c: problem.estimate(agent, c).memory_bytes)
    e = problem.estimate(agent, c)
    res = problem.agents[agent]
    base = problem.shape.base_bytes(c.quant, res.compute_dtype(c.quant))
    mib = 2**20
    return (
        f"fedpipe needs about {e.memory_bytes / mib:.0f} MiB even with the smallest "
        f"configuration (rank {c.tier_ranks[0]}, batch {c.batch}, {c.quant} base: runtime "
        f"{RUNTIME_BYTES / mib:.0f} + base {base / mib:.0f} + adapter, optimizer and "
        f"activations {(e.memory_bytes - RUNTIME_BYTES - base) / mib:.0f} MiB); the agent "
        f"has {res.memory_bytes / mib:.0f} MiB {'GPU memory' if res.gpu else 'RAM'} available "
        f"and {problem.options.memory_fraction:.0%} of it may be used"
    )


def memory_quant(problem: Problem, agent: str, *, batch: int) -> str:
    """The most precise allowed base that holds the smallest adapter at ``batch``; if none
    does, the one that needs the least memory."""
    configs = sorted(_minimal(problem, batch), key=lambda c: -PRECISION_LEVEL[c.quant])
    for c in configs:
        if problem.fits(agent, c):
            return c.quant
    return min(configs, key=lambda c: problem.estimate(agent, c).memory_bytes).quant
