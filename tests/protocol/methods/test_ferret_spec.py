"""Ferret's wire spec and shared math: groups, seeded signs, projection, the bit-exact step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol import payloads, randomness
from protocol.methods import BadParams, parse_params
from protocol.methods.ferret import math as fm
from protocol.methods.ferret import spec

LLAMA_LAYER = {
    "input_layernorm.weight": (64,),
    "mlp.down_proj.weight": (64, 128),
    "mlp.gate_proj.weight": (128, 64),
    "mlp.up_proj.weight": (128, 64),
    "post_attention_layernorm.weight": (64,),
    "self_attn.k_proj.weight": (32, 64),
    "self_attn.o_proj.weight": (64, 64),
    "self_attn.q_proj.weight": (64, 64),
    "self_attn.v_proj.weight": (32, 64),
}


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (500, 64)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{k}": v for k, v in LLAMA_LAYER.items()}
    shapes["model.norm.weight"] = (64,)
    return shapes


# --- groups -------------------------------------------------------------------------------------


def test_layout_groups_large_matrices_alone_and_packs_small_ones() -> None:
    layout = fm.build_layout(llama_shapes(12))
    # median numel 4096, target int(0.9 * 4096) = 3686: 8192- and 4096-element matrices and
    # the embedding are alone; a 64-element norm packs with a following 2048-element k_proj,
    # and a layer's v_proj with the next layer's input norm (names in natural order)
    members = [[m.name for m in g.members] for g in layout.groups]
    assert members[:4] == [
        ["model.embed_tokens.weight"],
        ["model.layers.0.input_layernorm.weight"],
        ["model.layers.0.mlp.down_proj.weight"],
        ["model.layers.0.mlp.gate_proj.weight"],
    ]
    assert [
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] in members
    assert [
        "model.layers.2.self_attn.v_proj.weight",
        "model.layers.3.input_layernorm.weight",
    ] in members
    assert members[-1] == ["model.layers.11.self_attn.v_proj.weight", "model.norm.weight"]
    flat = [n for ms in members for n in ms]
    assert flat.index("model.layers.2.mlp.up_proj.weight") < flat.index(
        "model.layers.10.input_layernorm.weight"
    )
    assert len(layout.groups) == 2 + 12 * 7
    assert layout.numel == 500 * 64 + 12 * (2 * 64 + 3 * 8192 + 2 * 2048 + 2 * 4096) + 64
    assert layout.groups[0].name == "model.embed_tokens.weight#1"
    assert layout.groups[-1].name == "model.layers.11.self_attn.v_proj.weight#2"


def test_layout_packs_consecutive_small_tensors_up_to_the_target() -> None:
    shapes = {"a.bias": (10,), "b.bias": (10,), "c.bias": (10,), "d.weight": (100,), "e": (100,)}
    layout = fm.build_layout(shapes)  # median 10, target 9: nothing packs
    assert [len(g.members) for g in layout.groups] == [1, 1, 1, 1, 1]
    shapes = {f"n{i}": (4,) for i in range(6)} | {f"w{i}": (40,) for i in range(7)}
    layout = fm.build_layout(shapes)  # median 40, target 36: nine 4-element norms per group
    assert [len(g.members) for g in layout.groups][:2] == [6, 1]
    packed = layout.groups[0]
    assert packed.name == "n0#6"
    assert [m.offset for m in packed.members] == [0, 4, 8, 12, 16, 20]
    assert packed.numel == 24


def test_layout_is_a_pure_function_of_names_and_shapes() -> None:
    shapes = llama_shapes(3)
    shuffled = dict(reversed(list(shapes.items())))
    assert fm.build_layout(shapes) == fm.build_layout(shuffled)
    assert fm.build_layout(shapes).sha256() == fm.build_layout(shuffled).sha256()
    changed = dict(shapes) | {"model.norm.weight": (65,)}
    assert fm.build_layout(changed).sha256() != fm.build_layout(shapes).sha256()


# --- seeds and signs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "n"), [(0, 1), (0, 64), (3, 200), (64, 130), (1000, 4097)])
def test_signs_are_the_shared_rademacher_stream(start: int, n: int) -> None:
    key = fm.basis_key(randomness.derive_key(7, 3), 5, "model.layers.0.mlp.up_proj.weight#1")
    want = randomness.rademacher(key, n, start)
    assert np.array_equal(fm.signs(key, n, start=start).numpy(), want)


def test_basis_key_derivation_is_the_documented_one() -> None:
    b = randomness.derive_key(11, 4)
    assert b == randomness.mix64(11 ^ randomness.mix64(4))
    want = randomness.stream_key(randomness.derive_key(b, 9), "g#2")
    assert fm.basis_key(b, 9, "g#2") == want
    assert fm.basis_key(b, 9, "g#2") != fm.basis_key(b, 8, "g#2")


def test_the_run_pool_is_key_seed_0() -> None:
    """One pool for every round of the run (the paper's rule): its base seed has no round."""
    assert fm.pool_base_seed(3) == randomness.derive_key(3, 0) != fm.pool_base_seed(4)


def test_seeds_per_group_follows_the_norm_rule() -> None:
    assert fm.seeds_per_group([1.0, 0.5, 0.26, 0.0], 32) == [32, 16, 8, 2]
    assert fm.seeds_per_group([0.0, 0.0], 32) == [2, 2]  # the reference's 1e-8 floor
    with pytest.raises(ValueError):
        fm.seeds_per_group([float("nan")], 8)


# --- projection and reconstruction --------------------------------------------------------------


def test_projection_matches_the_closed_form_on_a_tiny_group() -> None:
    d, n = 8, 3
    delta = torch.tensor([0.5, -1.0, 0.25, 2.0, 0.0, -0.75, 1.5, 0.125])
    keys = [(s, fm.basis_key(123, s, "g#1")) for s in (1, 4, 6)]
    got = fm.project(delta, keys, n)
    for (_, key), gamma in zip(keys, got, strict=True):
        r = randomness.rademacher(key, d, dtype=np.float64)
        v = r / math.sqrt(d)
        want = (d / n) * float(np.dot(delta.numpy().astype(np.float64), v))
        assert gamma == pytest.approx(want, rel=1e-6)


def test_step_is_exactly_the_documented_float32_chain() -> None:
    shapes = {"w": (3, 5), "b": (4,)}
    layout = fm.build_layout(shapes)
    g = layout.groups[0]  # median 15 -> target 13: "b" and "w" are apart
    assert [m.name for m in g.members] == ["b"]
    params = {"w": torch.randn(3, 5), "b": torch.randn(4)}
    start = {k: v.clone() for k, v in params.items()}
    triples = (
        torch.tensor([1, 0, 1, 1], dtype=torch.int32),
        torch.tensor([7, 2, 0, 3], dtype=torch.int32),
        torch.tensor([0.3, -1.25, 25.0, -0.01]),
    )
    stats = fm.apply_step(params, layout, 99, *triples, server_lr=0.5, clip_norm=10.0)
    assert (stats.terms, stats.clipped) == (4, 1)
    for gi, name, terms in ((0, "b", [(2, -1.25)]), (1, "w", [(0, 25.0), (3, -0.01), (7, 0.3)])):
        d = layout.groups[gi].numel
        acc = np.zeros(d, dtype=np.float32)
        for s, gamma in terms:  # ascending seed order
            clipped = gamma * 10.0 / (abs(gamma) + 1e-8) if abs(gamma) > 10.0 else gamma
            c = np.float32(0.5 * clipped / math.sqrt(d))
            r = randomness.rademacher(fm.basis_key(99, s, layout.groups[gi].name), d)
            acc = (acc + c * r).astype(np.float32)
        want = (start[name].numpy().reshape(-1) + acc).astype(np.float32)
        assert np.array_equal(params[name].numpy().reshape(-1), want)


def test_projection_then_reconstruction_is_unbiased() -> None:
    d, k, n, trials = 16, 8, 2, 3000
    layout = fm.build_layout({"w": (4, 4)})
    g = layout.groups[0]
    delta = torch.linspace(-1.0, 1.0, d)
    total = torch.zeros(d, dtype=torch.float64)
    rng = np.random.default_rng(0)
    for t in range(trials):
        base = randomness.derive_key(5, t)
        chosen = fm.choose_seeds(k, n, rng)
        gammas = fm.project(delta, [(s, fm.basis_key(base, s, g.name)) for s in chosen], n)
        params = {"w": torch.zeros(4, 4)}
        triples = (
            torch.zeros(n, dtype=torch.int32),
            torch.tensor(chosen, dtype=torch.int32),
            torch.tensor(gammas),
        )
        fm.apply_step(params, layout, base, *triples, server_lr=1.0, clip_norm=1e6)
        total += params["w"].reshape(-1).double()
    mean = total / trials
    # each trial has per-element standard deviation ~ |Δ| / sqrt(n) = 1.7; the mean's is ~0.03
    error = float((mean - delta.double()).norm() / delta.double().norm())
    assert error < 0.1
    # the reference's truncated-normal bases would give Δ/3 on average: far outside
    slope = float((mean @ delta.double()) / (delta.double() @ delta.double()))
    assert slope == pytest.approx(1.0, abs=0.06)


def test_step_is_chunk_independent_and_order_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {f"n{i}": (37,) for i in range(4)} | {f"w{i}": (10, 10) for i in range(5)}
    shapes["x"] = (30, 40)
    layout = fm.build_layout(shapes)  # median 100, target 90: n0+n1 and n2+n3 packed
    assert [m.name for m in layout.groups[0].members] == ["n0", "n1"]  # n1 crosses 64 below
    assert layout.groups[7].members[0].name == "x"  # 1200 elements: 19 chunks of 64
    triples = (
        torch.tensor([0, 0, 1, 7, 7], dtype=torch.int32),
        torch.tensor([1, 5, 2, 0, 3], dtype=torch.int32),
        torch.tensor([0.5, -0.2, 3.0, 1.0, -7.5]),
    )
    torch.manual_seed(0)
    start = {n: torch.randn(s) for n, s in shapes.items()}
    whole = {n: t.clone() for n, t in start.items()}
    fm.apply_step(whole, layout, 42, *triples, server_lr=1.0, clip_norm=5.0)
    monkeypatch.setattr(fm, "CHUNK", 64)
    chunked = {n: t.clone() for n, t in start.items()}
    perm = torch.tensor([4, 2, 0, 3, 1])
    fm.apply_step(chunked, layout, 42, *(t[perm] for t in triples), server_lr=1.0, clip_norm=5.0)
    for name in shapes:
        assert torch.equal(whole[name], chunked[name])
        touched = name in ("n0", "n1", "n2", "n3", "x")
        assert torch.equal(whole[name], start[name]) != touched


def test_bf16_weights_take_the_float32_step_rounded_once() -> None:
    layout = fm.build_layout({"w": (8, 8)})
    w32 = torch.randn(8, 8)
    params = {"w": w32.to(torch.bfloat16)}
    ref = {"w": torch.zeros(8, 8)}
    triples = (torch.zeros(2, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    values = torch.tensor([0.4, -0.9])
    fm.apply_step(params, layout, 1, *triples, values, server_lr=1.0, clip_norm=10.0)
    fm.apply_step(ref, layout, 1, *triples, values, server_lr=1.0, clip_norm=10.0)
    want = (w32.to(torch.bfloat16).float() + ref["w"]).to(torch.bfloat16)
    assert params["w"].dtype == torch.bfloat16
    assert torch.equal(params["w"], want)


# --- params and payloads ------------------------------------------------------------------------


def test_params_defaults_and_bounds() -> None:
    p = parse_params("ferret", {})
    assert isinstance(p, spec.Params)
    assert (p.ferret.k, p.ferret.server_lr, p.ferret.clip_norm) == (spec.DEFAULT_K, 1.0, 10.0)
    assert p.ferret.basis == "rademacher" and p.ferret.dtype == "fp32"
    assert p.train.lr == 0.01
    bads = (
        {"k": 1},
        {"max_catchup": 64},
        {"layout": "xyz"},
        {"basis": "gaussian"},
        {"pool": "round"},
    )
    for bad in bads:
        with pytest.raises(BadParams, match="ferret"):
            parse_params("ferret", {"ferret": bad})


def test_server_lr_schedules() -> None:
    flat = spec.FerretParams(server_lr=2.0)
    assert [spec.server_lr_at(flat, r) for r in (1, 5)] == [2.0, 2.0]
    linear = spec.FerretParams(server_lr=10 / 3, anneal="linear", rounds=4)
    got = [spec.server_lr_at(linear, r) for r in (1, 2, 3, 4)]
    assert got == pytest.approx([10 / 3, 2.5, 5 / 3, 5 / 6], rel=1e-15)
    floor = spec.FerretParams(server_lr=3.0, server_lr_min=1.0, anneal="linear", rounds=2)
    assert [spec.server_lr_at(floor, r) for r in (1, 2, 3)] == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="ferret.rounds"):
        spec.server_lr_at(spec.FerretParams(anneal="linear"), 1)


def test_step_blob_names() -> None:
    assert spec.step_blob(12) == "step-000012"
    assert spec.step_round("step-000012") == 12
    assert spec.step_round("global") is None
    assert spec.step_round("step-x") is None


@pytest.mark.parametrize(("n", "header"), [(0, 384), (1, 384), (1000, 408), (1497, 408)])
def test_seedcoef_payload_is_twelve_bytes_per_triple_plus_a_fixed_header(
    n: int, header: int
) -> None:
    group = torch.arange(n, dtype=torch.int32) // 32
    seed = torch.arange(n, dtype=torch.int32) % 32
    blob = payloads.encode_seedcoef(
        group,
        seed,
        torch.full((n,), 0.5),
        base_seed=randomness.derive_key(0, 3),
        k=32,
        n_groups=212,
        method="ferret",
        round=3,
    )
    # the header is the safetensors JSON (names, dtypes, offsets, K, groups, base seed, round)
    # padded to 8 bytes: its length moves only with the digits of the offsets
    assert len(blob) == 12 * n + header
    assert payloads.decode(blob).header_nbytes == header
