"""FedBiOT's wire layer: the layer plan, the bundle, the alignment state, deltas and their chain."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from protocol.errors import PayloadError, PayloadMismatch
from protocol.methods import parse_params
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import state as st

H, KV, FF = 8, 4, 16
LINEARS = {
    "self_attn.q_proj": (H, H),
    "self_attn.k_proj": (KV, H),
    "self_attn.v_proj": (KV, H),
    "self_attn.o_proj": (H, H),
    "mlp.gate_proj": (FF, H),
    "mlp.up_proj": (FF, H),
    "mlp.down_proj": (H, FF),
}


def fake_model(layers: int, vocab: int = 32) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict (tied embeddings) with distinct values per tensor."""
    gen = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, H, generator=gen)}
    for i in range(layers):
        for path, shape in LINEARS.items():
            state[f"model.layers.{i}.{path}.weight"] = torch.randn(*shape, generator=gen) + i
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.full((H,), float(i))
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(H)
    state["model.norm.weight"] = torch.ones(H)
    return state


@pytest.mark.parametrize(
    ("layers", "k", "drop", "kept"),
    [
        (30, 2, 0.5, (0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27)),  # SmolLM2-135M
        (6, 2, 0.5, (0, 3)),
        (12, 2, 0.0, tuple(range(10))),
        (12, 2, 0.6, (0, 3, 6, 9)),
        (12, 2, 0.5, (0, 2, 5, 7, 9)),  # 4.5 rounds up
        (12, 4, 0.99, (0, 7)),  # first and last bottom layer always stay
        (3, 2, 0.5, (0,)),
    ],
)
def test_plan_keeps_first_and_last_bottom_layers_at_a_uniform_stride(
    layers: int, k: int, drop: float, kept: tuple[int, ...]
) -> None:
    plan = emu.plan_emulator(layers, k, drop)
    assert plan.emulator == kept
    assert plan.adapter == tuple(range(layers - k, layers))
    assert plan.layer_map == kept + plan.adapter
    assert plan.adapter_to_full() == {len(kept) + j: layers - k + j for j in range(k)}
    gaps = {b - a for a, b in zip(kept, kept[1:], strict=False)}
    assert max(gaps, default=1) - min(gaps, default=1) <= 1  # uniform up to rounding


def test_plan_refuses_what_cannot_be_cut() -> None:
    with pytest.raises(ValueError, match="adapter layers"):
        emu.plan_emulator(4, 4, 0.5)
    with pytest.raises(ValueError, match="drop_ratio"):
        emu.plan_emulator(10, 2, 1.0)


def test_renaming_layers_between_the_small_and_the_full_model() -> None:
    name = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    assert emu.renamed(name, {2: 28}) == name.replace("layers.2.", "layers.28.")
    assert emu.layer_of("model.layers.17.mlp.down_proj.weight") == 17
    assert emu.layer_of("model.norm.weight") is None
    with pytest.raises(PayloadMismatch):
        emu.renamed(name, {3: 28})


def test_bundle_holds_exactly_the_small_model_and_round_trips() -> None:
    full = fake_model(6)
    plan = emu.plan_emulator(6, 2, 0.5)  # emulator 0, 3; adapter 4, 5
    names = emu.bundle_names([*full, "lm_head.weight"], plan, tied=True)
    assert "lm_head.weight" not in names  # tied: the embeddings serve
    assert names["model.layers.1.mlp.down_proj.weight"] == "model.layers.3.mlp.down_proj.weight"
    assert (
        names["model.layers.3.self_attn.q_proj.weight"] == "model.layers.5.self_attn.q_proj.weight"
    )
    assert not any(emu.layer_of(n) in (1, 2) for n in names.values())  # dropped full layers
    tensors = {small: full[name].to(torch.bfloat16) for small, name in names.items()}
    config = emu.small_config({"num_hidden_layers": 6, "model_type": "llama"}, plan)
    data = emu.encode_bundle(tensors, config, plan, "ab" * 32)
    bundle = emu.decode_bundle(data)
    assert bundle.plan == plan and bundle.config["num_hidden_layers"] == 4
    assert bundle.base_sha256 == "ab" * 32
    assert all(torch.equal(bundle.tensors[n], tensors[n]) for n in tensors)
    per_layer = sum(a * b for a, b in LINEARS.values()) + 2 * H
    assert emu.param_count(tuple(t.shape) for t in bundle.tensors.values()) == (
        32 * H + 4 * per_layer + H
    )
    assert len(data) == pytest.approx(2 * (32 * H + 4 * per_layer + H), abs=4096)  # bf16 + header
    assert emu.encode_bundle(tensors, config, plan, "ab" * 32) == data  # one sha256 per bundle


def test_a_bundle_whose_map_disagrees_with_its_config_is_refused() -> None:
    plan = emu.plan_emulator(6, 2, 0.5)
    tensors = {"model.layers.0.mlp.down_proj.weight": torch.zeros(H, FF)}
    config = {"num_hidden_layers": 3}  # the map says 4
    with pytest.raises(PayloadError, match="disagree"):
        emu.decode_bundle(emu.encode_bundle(tensors, config, plan, "ab" * 32))


def targets() -> dict[str, tuple[int, int]]:
    shapes = {n: tuple(t.shape) for n, t in fake_model(4).items()}
    return st.align_targets(shapes, 2, ("o_proj", "down_proj"))


def test_alignment_targets_and_the_seeded_start() -> None:
    t = targets()
    assert list(t) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    state = st.init_state(t, 3, seed=5)
    again = st.init_state(t, 3, seed=5)
    assert all(torch.equal(state[n], again[n]) for n in state)
    a = state["model.layers.0.mlp.down_proj.A"]
    assert a.shape == (3, FF) and a.dtype == torch.float32
    assert 0 < float(a.abs().max()) <= 1 / math.sqrt(FF)
    assert not state["model.layers.0.mlp.down_proj.B"].any()
    other = st.init_state(t, 3, seed=6)
    assert not torch.equal(other["model.layers.0.mlp.down_proj.A"], a)
    assert st.state_sha(state, 0) == st.state_sha(again, 0) != st.state_sha(other, 0)


def chain(versions: int) -> tuple[list[dict[str, torch.Tensor]], dict[int, Any], list[str]]:
    """The server's side: states 0..versions, bf16 deltas, and the state sha256s."""
    gen = torch.Generator().manual_seed(1)
    states = [st.init_state(targets(), 3, seed=5)]
    deltas = {}
    for v in range(1, versions + 1):
        trained = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in states[-1].items()}
        deltas[v] = st.make_delta(trained, states[-1])
        states.append(st.apply_delta(states[-1], deltas[v]))
    return states, deltas, [st.state_sha(s, v) for v, s in enumerate(states)]


def test_deltas_reproduce_the_servers_state_bit_for_bit_from_any_start() -> None:
    states, deltas, shas = chain(3)
    specs = {n: tuple(t.shape) for n, t in states[0].items()}
    assert all(d.dtype == torch.bfloat16 for d in deltas[1].values())
    blob = st.decode_align(st.encode_deltas(deltas, 0, shas), specs)
    assert blob.versions == [0, 1, 2, 3]

    def init() -> dict[str, torch.Tensor]:
        return st.init_state(targets(), 3, seed=5)

    def nothing(sha: str) -> None:
        return None

    for start in (None, (1, states[1]), (2, states[2])):  # fresh, or a round or two behind
        version, state = st.advance(start, blob, nothing, init)
        assert version == 3 and all(torch.equal(state[n], states[3][n]) for n in state)
    # a restarted receiver finds its stored state by sha256
    version, state = st.advance(None, blob, lambda sha: states[2] if sha == shas[2] else None, init)
    assert version == 3 and st.state_sha(state, 3) == shas[3]
    # deltas that start past what the receiver has cannot be applied
    later = st.decode_align(st.encode_deltas({3: deltas[3]}, 2, shas[2:]), specs)
    with pytest.raises(PayloadMismatch, match="no state of versions 2..3"):
        st.advance((1, states[1]), later, nothing, init)
    # a wrong result is caught by the target's sha256
    forged = st.encode_deltas(deltas, 0, [*shas[:3], "0" * 64])
    with pytest.raises(PayloadMismatch, match="another sha256"):
        st.advance(None, st.decode_align(forged, specs), nothing, init)


def test_a_whole_state_replaces_anything_and_shapes_are_checked() -> None:
    states, _, _ = chain(2)
    specs = {n: tuple(t.shape) for n, t in states[0].items()}
    blob = st.decode_align(st.state_bytes(states[2], 2), specs)
    version, state = st.advance((1, states[1]), blob, lambda sha: None, dict)
    assert version == 2 and all(torch.equal(state[n], states[2][n]) for n in state)
    wrong = {**specs, "model.layers.0.mlp.down_proj.A": (4, FF)}
    with pytest.raises(PayloadMismatch):
        st.decode_align(st.state_bytes(states[2], 2), wrong)


def test_merged_weights_are_w_plus_scaled_ba_rounded_once() -> None:
    states, _, _ = chain(1)
    base = {f"{m}.weight": torch.randn(*s) for m, s in targets().items()}
    merged = st.merged_weights(base, states[1], 2.0)
    assert set(merged) == set(base)
    m = "model.layers.1.self_attn.o_proj"
    b, a = states[1][f"{m}.B"].double(), states[1][f"{m}.A"].double()
    want = (base[f"{m}.weight"].double() + 2.0 * b @ a).float()
    assert torch.equal(merged[f"{m}.weight"], want)


def test_params_validate_the_method_blocks() -> None:
    params = parse_params("fedbiot", {"emulator": {"adapter_layers": 3}, "prox": 0.1})
    assert params.emulator.adapter_layers == 3  # type: ignore[attr-defined]
    assert params.align.scaling == 2.0  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="drop_ratio"):
        parse_params("fedbiot", {"emulator": {"drop_ratio": 1.0}})
