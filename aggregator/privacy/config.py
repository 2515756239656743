"""The ``[privacy]`` section of a run: secure aggregation and client-level differential privacy.

Both are off by default. :func:`privacy_problems` lists, for ``config check``, every reason a
run's privacy settings cannot work with its method and topology, so a run never starts with a
mode that would silently not apply.

What secure aggregation covers, per method (see docs/security.md):

========  ============================================================================
fedit     yes: the LoRA factors, example-weighted FedAvg (rule ``fedavg``, no ``clip_norm``)
slora     yes: stage 1's masked values (the seeded mask puts every agent's values in the same
          layout) and stage 2's LoRA factors; the server's SVD switch works on the sum
ferret    yes: each agent masks the dense (group, seed) coefficient grid of the round's shared
          pool (zeros where it drew no seed), clamped to ``ferret.clip_norm`` by the agent,
          which must lie within ``secagg.clip_range``; either seed pool (``run``, ``round``)
fedpipe   no: agents send LoRA factors of different ranks, aggregated in ΔW space as
          products of each agent's own factors, which is not a sum of what they send
fedbiot   no: refused (its server aligns an emulator; not wired)
========  ============================================================================

Robust rules (``trimmed_mean``, ``median``) and ``clip_norm`` need every individual update, which
secure aggregation hides: refused. Agent-side clipping of differential privacy works instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.secagg.errors import SecAggError
from protocol.secagg.fixedpoint import check_capacity
from protocol.secagg.shapes import SecAggConfig

SECAGG_METHODS = frozenset({"fedit", "slora", "ferret"})
DP_METHODS = frozenset({"fedit"})
_WHY_NOT = {
    "fedpipe": "FedPipe aggregates LoRA factors of mixed ranks in ΔW space (B·A products), "
    "which is not a sum of what agents send",
    "fedbiot": "FedBiOT is not wired for secure aggregation",
}


class PrivacySection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    secure_aggregation: bool = False
    """SecAgg+: the aggregator learns only the sum of each round's updates."""
    secagg: SecAggConfig = SecAggConfig()
    max_weight: Annotated[int, Field(ge=1, le=10**9)] = 100_000
    """Largest example count an agent may weight its update by under secure aggregation."""
    max_agents: Annotated[int, Field(ge=2, le=10**6)] = 1000
    """Most agents one secure round may sum (sizes the fixed-point overflow check)."""
    dp: Literal["off", "central", "local"] = "off"
    """Client-level DP-FedAvg: ``central`` (the aggregator adds the noise to the sum) or
    ``local`` (each agent adds noise to its own clipped update)."""
    dp_clip: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    """L2 bound on each agent's update (ΔW of the LoRA factors) before noise."""
    noise_multiplier: Annotated[float, Field(gt=0, le=1e4)] | None = None
    """σ / clip. None with ``target_epsilon``: calibrated so the run's rounds reach it."""
    target_epsilon: Annotated[float, Field(gt=0, le=1e4)] | None = None
    """Stop the run before a round would take ε past this."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5


def privacy_problems(
    p: PrivacySection, method: str, method_params: Mapping[str, Any], *, tiered: bool
) -> list[str]:
    """Every reason a run's ``[privacy]`` settings ``p`` cannot apply to its method (``run.method``
    with its ``[method]`` table; ``tiered``: it has an upstream or regions), for ``config check``."""
    problems: list[str] = []
    if p.secure_aggregation:
        if method not in SECAGG_METHODS:
            why = _WHY_NOT.get(method, "not supported")
            problems.append(f"privacy: secure aggregation cannot run {method}: {why}")
        aggregation = method_params.get("aggregation", {})
        rule = aggregation.get("rule", "fedavg") if isinstance(aggregation, dict) else "fedavg"
        if rule != "fedavg":
            problems.append(
                f"privacy: the {rule} rule needs every individual update, which secure "
                "aggregation hides; use rule = fedavg"
            )
        if isinstance(aggregation, dict) and aggregation.get("clip_norm") not in (None, 0):
            problems.append(
                "privacy: aggregation.clip_norm clips individual updates at the aggregator, "
                "which secure aggregation hides; use [privacy] dp_clip (clipped by each agent)"
            )
        if tiered:
            problems.append("privacy: secure aggregation does not run through regional tiers")
        if method == "ferret":
            problems += _ferret_problems(p, method_params)
        s = p.secagg
        try:
            check_capacity(p.max_agents, s.clip_range * p.max_weight, s.fraction_bits)
        except SecAggError as exc:
            problems.append(f"privacy: {exc}")
    if p.dp != "off":
        if method not in DP_METHODS:
            problems.append(f"privacy: differential privacy is wired for fedit only, not {method}")
        if p.noise_multiplier is None and p.target_epsilon is None:
            problems.append("privacy: dp needs noise_multiplier or target_epsilon")
    elif p.target_epsilon is not None or p.noise_multiplier is not None:
        problems.append("privacy: target_epsilon / noise_multiplier need dp = central or local")
    return problems


def _ferret_problems(p: PrivacySection, method_params: Mapping[str, Any]) -> list[str]:
    """Ferret under secure aggregation: every agent clamps its coefficients to
    ``ferret.clip_norm`` and encodes them in fixed point within ``secagg.clip_range``."""
    from protocol.methods.ferret.spec import FerretParams

    raw = method_params.get("ferret", {})
    try:
        ferret = FerretParams.model_validate(raw if isinstance(raw, dict) else {})
    except ValueError:
        return []  # the method's own parameter check reports it
    if ferret.clip_norm > p.secagg.clip_range:
        return [
            f"privacy: ferret.clip_norm {ferret.clip_norm:g} exceeds secagg.clip_range "
            f"{p.secagg.clip_range:g}: each agent clamps its coefficients to clip_norm and "
            "must encode them within clip_range; lower ferret.clip_norm or raise clip_range"
        ]
    return []
