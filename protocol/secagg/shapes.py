"""What each secure-aggregation stage exchanges, and the per-run settings both sides share.

A SecAgg+ round has four stages around the method's own work (Bell et al. 2020; Flower's
``secaggplus_workflow`` names them alike):

==========  ======================  ===============================================
stage       agent → aggregator      aggregator → agent
==========  ======================  ===============================================
advertise   :class:`KeyAdvert`      :class:`Roster` (participants, neighbours' keys)
share       sealed shares per       :class:`Inbox` (the sealed shares addressed to it)
            neighbour
mask        the masked vector       :class:`UnmaskRequest` (who survived, who dropped)
unmask      revealed shares         — (the aggregator now holds the sum only)
==========  ======================  ===============================================

These are plain frozen dataclasses: the sans-IO halves exchange them in-process, and the wire
adapters (``to_params``/``from_params``) carry them as hex inside a task's JSON parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.secagg.errors import SecAggError
from protocol.secagg.fixedpoint import DEFAULT_FRACTION_BITS


class SecAggConfig(BaseModel):
    """Secure-aggregation settings of a run (``[privacy]`` in the aggregator config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    degree: int = Field(default=8, ge=2, le=1000, multiple_of=2)
    """Neighbours per agent in the sparse graph (SecAgg+'s k); the full graph when k >= n - 1."""
    threshold_ratio: float = Field(default=0.6, gt=0.5, le=1.0)
    """Shamir threshold as a share of an agent's neighbours: t = ceil(ratio x neighbours).
    Above one half, so the aggregator cannot get both kinds of share of one agent from honest
    neighbours; up to (1 - ratio) of an agent's neighbours may drop out."""
    clip_range: float = Field(default=64.0, gt=0, le=2.0**40)
    """Largest |value| an agent may encode (after weighting by its example count)."""
    fraction_bits: int = Field(default=DEFAULT_FRACTION_BITS, ge=0, le=40)
    min_survivors: int = Field(default=2, ge=1, le=100_000)
    """Fewer agents than this left at any stage: the round fails rather than reveal a sum of one."""

    def threshold(self, neighbours: int) -> int:
        return max(1, math.ceil(self.threshold_ratio * neighbours))


@dataclass(frozen=True)
class KeyAdvert:
    """An agent's two X25519 public keys for this round: ``c`` encrypts shares, ``s`` masks."""

    pk_c: bytes
    pk_s: bytes


@dataclass(frozen=True)
class Roster:
    """Who takes part, the graph seed, and this agent's neighbours' public keys."""

    participants: tuple[str, ...]
    graph_seed: int
    keys: dict[str, KeyAdvert]


@dataclass(frozen=True)
class UnmaskRequest:
    """Agents whose masked vector arrived (reveal their self-mask share) and agents that
    shared but sent none (reveal their mask-key share)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


def _hex(raw: str, what: str) -> bytes:
    try:
        return bytes.fromhex(raw)
    except (ValueError, TypeError):
        raise SecAggError(f"{what} is not hex") from None


def advert_to_params(advert: KeyAdvert) -> dict[str, Any]:
    return {"pk_c": advert.pk_c.hex(), "pk_s": advert.pk_s.hex()}


def advert_from_params(params: dict[str, Any]) -> KeyAdvert:
    return KeyAdvert(_hex(params.get("pk_c", ""), "pk_c"), _hex(params.get("pk_s", ""), "pk_s"))


def roster_to_params(roster: Roster) -> dict[str, Any]:
    return {
        "participants": list(roster.participants),
        "graph_seed": roster.graph_seed,
        "keys": {a: advert_to_params(k) for a, k in roster.keys.items()},
    }


def roster_from_params(params: dict[str, Any]) -> Roster:
    try:
        keys = {str(a): advert_from_params(k) for a, k in dict(params["keys"]).items()}
        return Roster(
            tuple(str(p) for p in params["participants"]), int(params["graph_seed"]), keys
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SecAggError(f"malformed roster: {exc}") from None


def sealed_to_params(sealed: dict[str, bytes]) -> dict[str, str]:
    return {a: s.hex() for a, s in sealed.items()}


def sealed_from_params(params: Any) -> dict[str, bytes]:
    if not isinstance(params, dict):
        raise SecAggError("sealed shares must be a mapping")
    return {str(a): _hex(s, "a sealed share") for a, s in params.items()}


def request_to_params(request: UnmaskRequest) -> dict[str, Any]:
    return {"survivors": list(request.survivors), "dropped": list(request.dropped)}


def request_from_params(params: dict[str, Any]) -> UnmaskRequest:
    try:
        return UnmaskRequest(
            tuple(str(a) for a in params["survivors"]), tuple(str(a) for a in params["dropped"])
        )
    except (KeyError, TypeError) as exc:
        raise SecAggError(f"malformed unmask request: {exc}") from None
