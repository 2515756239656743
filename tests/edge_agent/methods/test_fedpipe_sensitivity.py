"""AdaLoRA's smoothed sensitivity of the adapters (edge_agent/methods/fedpipe/sensitivity.py),
against the formulas written out by hand (a train task's report: test_fedpipe_client.py)."""

from __future__ import annotations

import pytest
import torch

from edge_agent.methods.fedpipe.sensitivity import Sensitivity

MOD = "model.layers.0.self_attn.q_proj"


class Params:
    """Just ``named_parameters`` with peft's names (all the class reads)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(2, 3, generator=g))
        self.b = torch.nn.Parameter(torch.randn(4, 2, generator=g))
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [
            (f"base_model.model.{MOD}.lora_A.default.weight", self.a),
            (f"base_model.model.{MOD}.lora_B.default.weight", self.b),
            (f"base_model.model.{MOD}.base_layer.weight", self.frozen),
        ]


def test_sensitivity_is_adaloras_smoothed_product_with_its_uncertainty() -> None:
    p = Params()
    beta1, beta2 = 0.8, 0.7
    sens = Sensitivity(p, beta1, beta2)  # type: ignore[arg-type]
    assert list(sens.params) == [MOD] and set(sens.params[MOD]) == {"A", "B"}
    g = torch.Generator().manual_seed(1)
    ipt = {k: torch.zeros_like(t) for k, t in (("A", p.a), ("B", p.b))}
    unc = {k: torch.zeros_like(t) for k, t in (("A", p.a), ("B", p.b))}
    for _ in range(3):
        for side, t in (("A", p.a), ("B", p.b)):
            t.grad = torch.randn(t.shape, generator=g)
            now = (t.detach() * t.grad).abs()
            ipt[side] = beta1 * ipt[side] + (1 - beta1) * now
            unc[side] = beta2 * unc[side] + (1 - beta2) * (now - ipt[side]).abs()
        sens.update()
        with torch.no_grad():
            p.a.add_(0.1)  # the weights move between steps, as an optimizer would
            p.b.sub_(0.05)
    want = float((ipt["A"] * unc["A"]).mean() + (ipt["B"] * unc["B"]).mean())
    assert sens.scores()[MOD] == pytest.approx(want, rel=1e-6)
    assert want > 0


def test_no_step_no_sensitivity() -> None:
    assert Sensitivity(Params()).scores() == {MOD: 0.0}  # type: ignore[arg-type]
