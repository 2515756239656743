"""FedPipe's planner: the memory model against measured figures, MILP against brute force, and
the configurations it gives to slower, smaller and bigger agents."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from aggregator.methods.fedpipe import plan as fp
from aggregator.methods.fedpipe import solve as fs
from protocol.messages import GpuInfo, Profile

# SmolLM2-135M: 30 layers of q,k,v,o (576x576, 192x576 k/v), gate/up (1536x576), down (576x1536)
SMOL = fp.ModelShape(body_params=106_168_320, other_params=28_346_688, layers=30, hidden=576)
SMOL_MODULES = [
    fp.Module(f"model.layers.{i}.{kind}", i_f, o_f)
    for i in range(30)
    for kind, i_f, o_f in (
        ("self_attn.q_proj", 576, 576),
        ("self_attn.k_proj", 576, 192),
        ("self_attn.v_proj", 576, 192),
        ("self_attn.o_proj", 576, 576),
        ("mlp.gate_proj", 576, 1536),
        ("mlp.up_proj", 576, 1536),
        ("mlp.down_proj", 1536, 576),
    )
]
# LLaMA-7B on paper: 32 layers, hidden 4096, MLP 11008, vocab 32000, untied head
LLAMA7B = fp.ModelShape(
    body_params=32 * (4 * 4096 * 4096 + 3 * 4096 * 11008),
    other_params=2 * 32000 * 4096 + 65 * 4096,
    layers=32,
    hidden=4096,
)
LLAMA7B_MODULES = [
    fp.Module(f"model.layers.{i}.self_attn.{k}_proj", 4096, 4096) for i in range(32) for k in "qv"
]


def options(**kw: object) -> fp.Options:
    base: dict[str, object] = {
        "ranks": (2, 4, 8, 16),
        "batch_sizes": (1, 2, 4, 8),
        "quants": ("bf16", "int8", "nf4"),
        "examples_per_round": 24,
        "max_len": 128,
        "capacity_floor": 0.0,
        "memory_fraction": 0.9,
    }
    base.update(kw)
    return fp.Options(**base)  # type: ignore[arg-type]


def cpu(memory: float = 16e9, bandwidth: float = 100.0, gflops: float = 100.0) -> fp.Resources:
    return fp.Resources(gflops, gflops * 0.6, memory, bandwidth, rtt_ms=1.0, tokens_mean=51.0)


def smol_problem(agents: dict[str, fp.Resources], **kw: object) -> fp.Problem:
    tiers = fp.split_tiers(SMOL_MODULES[::2], 2)
    return fp.Problem(tiers, SMOL, agents, options(**kw))


# --- the memory model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "measured"),
    [("fp32", 538_060_288), ("bf16", 269_030_272), ("int8", 219_555_328), ("nf4", 173_120_128)],
)
def test_base_bytes_reproduce_the_measured_smollm2_weights(quant: str, measured: int) -> None:
    # model_store.base_param_bytes of SmolLM2-135M loaded in each precision (see the constants)
    assert SMOL.base_bytes(quant) == pytest.approx(measured, rel=2e-4)


def test_model_shape_reads_the_tiny_model(tiny_model_dir: Path) -> None:
    shape, linears = fp.model_shape(tiny_model_dir)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert shape.body_params == 2 * per_layer
    assert (shape.layers, shape.hidden) == (2, 64)
    assert linears["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert linears["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert len(linears) == 14


def test_estimate_follows_the_written_model() -> None:
    p = smol_problem({"a": cpu(bandwidth=8.0)})
    c = fp.Config((8, 4), 4, "int8")
    e = p.estimate("a", c)
    tier0, tier1 = p.tiers
    lora = 8 * sum(m.in_features + m.out_features for m in tier0) + 4 * sum(
        m.in_features + m.out_features for m in tier1
    )
    assert e.lora_params == lora and e.steps == 6 and e.capacity == 8 * len(tier0) + 4 * len(tier1)
    assert e.payload_bytes == 4 * lora + fp.PAYLOAD_HEADER
    step = (
        fp.OVERHEAD_GFLOP["int8"]
        + fp.KAPPA["int8"] * 4 * 51 * (4 * SMOL.body_params + 6 * lora) / 1e9
    ) / 100
    comm = 2 * e.payload_bytes * 8 / 8e6 + 2 * 1.0 / 1000
    assert e.seconds == pytest.approx(6 * step + comm, rel=1e-12)
    act = fp.ACT_PEAK * 4 * 128 * fp.ACT_TOKEN["fp32"] * 30 * 576  # int8 computes in fp32 on CPU
    assert e.memory_bytes == pytest.approx(
        fp.RUNTIME_BYTES + SMOL.base_bytes("int8") + 16 * lora + act
    )


# --- exact solvers ------------------------------------------------------------------------------


def random_problem(rng: random.Random) -> fp.Problem:
    ranks = tuple(sorted(rng.sample([1, 2, 4, 8, 16, 32], rng.randint(2, 3))))
    batches = tuple(sorted(rng.sample([1, 2, 4, 8, 16], rng.randint(1, 3))))
    quants = tuple(rng.sample(["nf4", "int8", "bf16", "fp32"], rng.randint(1, 3)))
    modules = rng.sample(SMOL_MODULES, rng.randint(2, 12))
    tiers = fp.split_tiers(modules, rng.randint(1, 2))
    agents = {}
    for i in range(rng.randint(1, 3)):
        agents[f"a{i}"] = fp.Resources(
            gflops_fp32=rng.uniform(5, 300),
            gflops_bf16=rng.uniform(0, 300),
            memory_bytes=rng.uniform(1.1e9, 6e9),
            bandwidth_mbps=rng.choice([0.5, 2.0, 10.0, 100.0, 1000.0]) * rng.uniform(0.8, 1.2),
            rtt_ms=rng.uniform(0, 200),
            gpu=rng.random() < 0.3,
            tokens_mean=rng.uniform(20, 128),
        )
    n = len(agents) * sum(len(t) for t in tiers)
    floor = rng.choice([0.0, 0.3, 0.6, 0.9, 1.5]) * n * max(ranks)
    opts = options(
        ranks=ranks,
        batch_sizes=batches,
        quants=quants,
        examples_per_round=rng.randint(1, 64),
        capacity_floor=floor,
    )
    return fp.Problem(tiers, SMOL, agents, opts)


def check_feasible(p: fp.Problem, s: fp.Solution) -> None:
    for agent, c in s.choice.items():
        assert p.fits(agent, c)
    if not s.capacity_relaxed:
        assert sum(e.capacity for e in s.estimates.values()) >= p.options.capacity_floor
    assert s.t_max == pytest.approx(max(e.seconds for e in s.estimates.values()), rel=1e-12)


def test_milp_matches_exhaustive_search_on_random_profiles() -> None:
    rng = random.Random(4)
    solved = relaxed = 0
    while solved < 60:
        p = random_problem(rng)
        try:
            brute = fs.solve_exhaustive(p)
        except fp.PlanError:  # some agent fits no configuration: both must say so
            with pytest.raises(fp.PlanError):
                fs.solve_milp(p)
            continue
        milp = fs.solve_milp(p)
        assert milp.t_max == pytest.approx(brute.t_max, rel=1e-9)
        assert milp.value == brute.value  # integer: capacity first, then precision
        assert milp.capacity_relaxed == brute.capacity_relaxed
        check_feasible(p, milp)
        check_feasible(p, brute)
        solved += 1
        relaxed += brute.capacity_relaxed
    assert 0 < relaxed < solved  # both regimes were exercised


def test_capacity_floor_moves_rank_to_the_fast_agent() -> None:
    agents = {"fast": cpu(bandwidth=1000.0), "slow": cpu(bandwidth=2.0)}
    free = fs.solve_milp(smol_problem(agents))
    modules = sum(len(t) for t in smol_problem(agents).tiers)
    # without a floor the slow link takes the smallest rank; a floor of 2 agents x 9 ranks per
    # module average cannot be met by the fast agent's 16 alone: the slow one must carry more
    floored = fs.solve_milp(smol_problem(agents, capacity_floor=2 * modules * 10))
    assert free.estimates["slow"].capacity == 2 * modules
    assert floored.estimates["slow"].capacity > free.estimates["slow"].capacity
    assert floored.t_max > free.t_max
    assert sum(e.capacity for e in floored.estimates.values()) >= 2 * modules * 10


# --- who gets what ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("small", "what"),
    [
        (cpu(bandwidth=2.0), "bandwidth"),
        (cpu(gflops=10.0), "compute"),
        (cpu(memory=1.4e9), "memory"),
    ],
)
def test_a_slower_or_smaller_agent_gets_a_smaller_configuration(
    small: fp.Resources, what: str
) -> None:
    p = smol_problem({"big": cpu(), "small": small}, capacity_floor=0.0)
    s = fs.solve_milp(p)
    big, little = s.estimates["big"], s.estimates["small"]
    if what == "memory":
        assert little.memory_bytes < big.memory_bytes
        assert s.choice["small"].batch < s.choice["big"].batch
        assert little.memory_bytes <= 0.9 * 1.4e9
    else:
        assert little.capacity < big.capacity
        assert little.payload_bytes < big.payload_bytes
    assert s.t_max == pytest.approx(little.seconds)  # the small agent is the critical path


def test_gpu_memory_picks_nf4_int8_bf16_for_a_7b_model() -> None:
    def gpu(gib: float, bandwidth: float = 1000.0) -> fp.Resources:
        return fp.Resources(5e4, 2e5, gib * 2**30, bandwidth, gpu=True, tokens_mean=100.0)

    # the 8 GiB agent also has the slowest link: the others have time to spare for precision
    agents = {"g8": gpu(8, 50.0), "g16": gpu(16), "g24": gpu(24), "g80": gpu(80)}
    tiers = fp.split_tiers(LLAMA7B_MODULES, 1)
    p = fp.Problem(tiers, LLAMA7B, agents, options(quants=("bf16", "int8", "nf4")))
    picks = {a: fp.memory_quant(p, a, batch=1) for a in agents}
    assert picks == {"g8": "nf4", "g16": "int8", "g24": "bf16", "g80": "bf16"}
    s = fs.solve_milp(p)
    assert {a: c.quant for a, c in s.choice.items()} == picks
    assert s.choice["g80"].batch > s.choice["g8"].batch
    assert s.estimates["g8"].capacity < s.estimates["g80"].capacity
    assert fp.refusal(p, "g8") is None
    small = fp.Problem(tiers, LLAMA7B, {"g4": gpu(4)}, p.options)
    reason = fp.refusal(small, "g4")
    assert reason is not None and "nf4 base" in reason and "4096 MiB GPU memory" in reason


def test_refusal_names_the_need_and_what_the_agent_has() -> None:
    p = smol_problem({"tiny": cpu(memory=0.8e9), "ok": cpu(memory=2e9)})
    assert fp.refusal(p, "ok") is None
    reason = fp.refusal(p, "tiny")
    assert reason is not None
    need = min(
        p.estimate("tiny", fp.Config((2, 2), 1, q)).memory_bytes for q in ("bf16", "int8", "nf4")
    )
    assert f"about {need / 2**20:.0f} MiB" in reason and "763 MiB RAM" in reason
    with pytest.raises(fp.PlanError, match="tiny"):
        fs.solve_milp(p)
    fallback = fs.smallest(p)
    assert fallback.choice["tiny"].batch == 1 and fallback.capacity_relaxed


def test_agent_plan_round_trip_and_module_ranks() -> None:
    p = smol_problem({"a": cpu(bandwidth=30.0)})
    s = fs.solve_milp(p)
    plan = fp.agent_plans(p, s)["a"]
    assert fp.AgentPlan.from_json(plan.to_json()) == plan
    tiers = [[m.name for m in t] for t in p.tiers]
    ranks = plan.module_ranks(tiers)
    assert len(ranks) == len(SMOL_MODULES[::2])
    assert {ranks[m] for m in tiers[0]} == {plan.tier_ranks[0]}
    assert plan.tier_ranks[0] >= plan.tier_ranks[1]
    details = plan.details()
    assert details["rank"] == "/".join(map(str, plan.tier_ranks)) and details["quant"] == plan.quant
    assert math.isclose(float(details["est_s"]), s.t_max, abs_tol=0.05)


def test_resources_from_a_profile_prefer_the_heartbeat_and_the_gpu() -> None:
    profile = Profile(
        hostname="h",
        os="Linux",
        python="3.11",
        torch="2",
        cpus=4,
        ram_total=8 << 30,
        ram_available=6 << 30,
        disk_free=1 << 40,
        matmul_gflops_fp32=50.0,
        matmul_gflops_bf16=20.0,
        bandwidth_mbps=40.0,
        rtt_ms=3.0,
        gpus=[GpuInfo(index=0, name="g", memory_total=24 << 30, memory_free=20 << 30)],
    )
    r = fp.resources(profile, rtt_ms=None, bandwidth_mbps=12.0, tokens=60.0)
    assert (r.memory_bytes, r.bandwidth_mbps, r.rtt_ms, r.gpu) == (20 << 30, 12.0, 3.0, True)
    assert r.gflops("nf4") == 20.0 and r.compute_dtype("nf4") == "bf16"
    cpu_only = profile.model_copy(update={"gpus": [], "bandwidth_mbps": None})
    r2 = fp.resources(cpu_only, default_bandwidth_mbps=77.0)
    assert (r2.memory_bytes, r2.bandwidth_mbps, r2.gpu) == (6 << 30, 77.0, False)
    assert r2.gflops("nf4") == 50.0 and r2.compute_dtype("nf4") == "fp32"


def test_split_tiers_keeps_importance_order() -> None:
    mods = SMOL_MODULES[:7]
    tiers = fp.split_tiers(mods, 2)
    assert [len(t) for t in tiers] == [4, 3] or [len(t) for t in tiers] == [3, 4]
    assert [m for t in tiers for m in t] == mods
    assert len(fp.split_tiers(mods[:1], 3)) == 1
