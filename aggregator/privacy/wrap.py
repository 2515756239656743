"""A run's server method with its ``[privacy]`` settings applied (secure aggregation, DP)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aggregator.methods import ServerMethod
from aggregator.privacy.dp_method import DpServer
from aggregator.privacy.secagg_method import SecureServer

if TYPE_CHECKING:
    from aggregator.ops.config import AggregatorConfig


def private_method(method: ServerMethod, config: AggregatorConfig) -> ServerMethod:
    """``method`` wrapped as ``config.privacy`` asks (``config check`` has vetted the pair)."""
    p = config.privacy
    if p.secure_aggregation:
        method = SecureServer(method, p.secagg, max_weight=p.max_weight)
    if p.dp != "off":
        method = DpServer(method, p, rounds=config.run.rounds, fraction=config.run.fraction)
    return method
