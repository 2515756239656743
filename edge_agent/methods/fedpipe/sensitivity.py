"""AdaLoRA's sensitivity of the adapters, accumulated while they train (Zhang et al., 2023, §3.3).

For every entry ``w`` of an adapter factor (``lora_A``, ``lora_B``), after each optimizer
step and with that step's gradient::

    I   = |w · ∂L/∂w|                                  (the sensitivity)
    Ī   ← β₁·Ī + (1 − β₁)·I                            (smoothed)
    Ū   ← β₂·Ū + (1 − β₂)·|I − Ī|                      (its uncertainty)
    s   = Ī · Ū

A matrix's importance is the mean ``s`` over its ``lora_A`` entries plus the mean over its
``lora_B`` entries (AdaLoRA scores a singular triplet the same way: its value plus the means of
its two singular vectors). The agent reports one float per adapted matrix.
"""

from __future__ import annotations

import re

import torch

_PEFT = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.[^.]+\.weight$")


def module_params(model: torch.nn.Module) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The trainable adapter factors by module and side (``"A"``, ``"B"``)."""
    out: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        m = _PEFT.match(name)
        if m is not None and p.requires_grad:
            out.setdefault(m["module"], {})[m["side"]] = p
    return out


class Sensitivity:
    """The smoothed sensitivity and uncertainty of every adapter entry of ``model``."""

    def __init__(self, model: torch.nn.Module, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.params = module_params(model)
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.unc: dict[tuple[str, str], torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the current weights and gradients (call after each optimizer step)."""
        for module, sides in self.params.items():
            for side, p in sides.items():
                if p.grad is None:
                    continue
                now = (p.detach() * p.grad.detach()).abs().float()
                key = (module, side)
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(now)
                    self.unc[key] = torch.zeros_like(now)
                ipt = self.ipt[key].mul_(self.beta1).add_(now, alpha=1 - self.beta1)
                self.unc[key].mul_(self.beta2).add_((now - ipt).abs(), alpha=1 - self.beta2)
        self.steps += 1

    def scores(self) -> dict[str, float]:
        """Per adapted module, ``mean(s over lora_A) + mean(s over lora_B)`` (0 before a step)."""
        out: dict[str, float] = {}
        for module, sides in self.params.items():
            total = 0.0
            for side in sides:
                key = (module, side)
                if key in self.ipt:
                    total += float((self.ipt[key] * self.unc[key]).double().mean())
            out[module] = total
        return out
