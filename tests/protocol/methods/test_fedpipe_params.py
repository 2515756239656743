"""FedPipe's wire spec (parameters) and its shared ΔW math."""

from __future__ import annotations

import pytest
import torch

from protocol.methods import BadParams, parse_params
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec


def test_local_flags_leave_all_seven_projections_as_candidates() -> None:
    p = parse_params("fedpipe", {"lora": {"r": 8, "alpha": 16.0}, "train": {"steps": 6}})
    assert isinstance(p, spec.Params)
    assert p.lora.target_modules == spec.TARGETS and p.ranks == {}
    assert p.plan.ranks == (2, 4, 8, 16) and p.plan.quants == ("bf16", "int8", "nf4")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lora": {"rank_pattern": {"q_proj": 4}}}, "leave rank_pattern empty"),
        ({"plan": {"ranks": [4, 4]}}, "distinct"),
        ({"plan": {"quants": ["nf4", "nf4"]}}, "distinct"),
        ({"plan": {"quants": ["fp8"]}}, "plan.quants"),
        ({"ranks": {"model.layers.0.self_attn.q_proj": 32}}, "exceed the largest planned rank 16"),
        ({"select": {"fraction": 0}}, "select.fraction"),
        ({"ranks": {"bad name!": 2}}, "ranks"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(BadParams, match=message):
        parse_params("fedpipe", params)


def test_grids_are_sorted() -> None:
    p = spec.Params.model_validate({"plan": {"ranks": [8, 1, 4], "batch_sizes": [4, 1]}})
    assert p.plan.ranks == (1, 4, 8) and p.plan.batch_sizes == (1, 4)


def test_names_round_trip() -> None:
    a_key, b_key = fm.keys("model.layers.3.mlp.up_proj")
    assert a_key == "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight"
    assert fm.module_of(a_key) == fm.module_of(b_key) == "model.layers.3.mlp.up_proj"
    assert fm.module_of("model.layers.3.mlp.up_proj.weight") is None
    assert fm.ranks_of({a_key: torch.zeros(3, 5), b_key: torch.zeros(7, 3)}) == {
        "model.layers.3.mlp.up_proj": 3
    }


def test_module_scaling_is_alpha_over_r_by_default_else_alpha_over_sqrt_r_r0() -> None:
    lora = spec.Params.model_validate({"lora": {"r": 8, "alpha": 16.0, "rslora": True}}).lora
    assert lora.peft_rslora and lora.peft_alpha == pytest.approx(16 / 8**0.5)
    assert [lora.module_scaling(r) for r in (1, 2, 8, 32)] == pytest.approx(
        [16 / (8 * r) ** 0.5 for r in (1, 2, 8, 32)]
    )
    assert lora.module_scaling(8) == pytest.approx(16 / 8)  # fedit's alpha / r at r0
    plain = spec.Params.model_validate({"lora": {"r": 8, "alpha": 16.0}}).lora
    assert not plain.rslora and not plain.peft_rslora and plain.peft_alpha == 16.0
    assert [plain.module_scaling(r) for r in (1, 2, 8)] == pytest.approx([16.0, 8.0, 2.0])


@pytest.mark.parametrize("rslora", [True, False])
@pytest.mark.parametrize("ranks", [(2, 3), (16, 16, 16)])  # the second sums past min(out, in)
def test_low_rank_sum_is_the_exact_weighted_mean(ranks: tuple[int, ...], rslora: bool) -> None:
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 24, 40
    alpha = spec.FedpipeLora(r=4, alpha=8.0, rslora=rslora).module_scaling
    acc = fm.LowRankSum()
    want = torch.zeros(out_f, in_f, dtype=torch.float64)
    weights = [3, 1, 5][: len(ranks)]
    for r, w in zip(ranks, weights, strict=True):
        a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
        acc.add(a, b, float(w), alpha)
        want += w * fm.delta(a, b, alpha)
    want /= sum(weights)
    u, s, vh = acc.svd(float(sum(weights)))
    torch.testing.assert_close((u * s) @ vh, want, rtol=0, atol=1e-12 * float(want.abs().max()))
    assert torch.all(s[:-1] >= s[1:])
    a_glob, b_glob = fm.global_factors(u, s, vh, alpha)
    assert a_glob.shape[0] == min(sum(ranks), out_f)
    torch.testing.assert_close(
        fm.delta(a_glob, b_glob, alpha), want, rtol=0, atol=1e-5 * float(want.abs().max())
    )


def test_a_zero_delta_keeps_one_zero_component() -> None:
    acc = fm.LowRankSum()
    scale = spec.FedpipeLora(alpha=4.0).module_scaling
    acc.add(torch.randn(2, 6), torch.zeros(4, 2), 1.0, scale)
    a, b = fm.global_factors(*acc.svd(1.0), scale)
    assert a.shape == (1, 6) and b.shape == (4, 1)
    assert float(fm.delta(a, b, scale).abs().max()) == 0.0
