"""Secure aggregation (SecAgg+) shared by both sides: the math, the crypto calls, the shapes.

The agent half is :mod:`edge_agent.privacy.secagg`, the aggregator half :mod:`aggregator.privacy.secagg`; both
are sans-IO state machines. See ``docs/security.md`` for the threat model.
"""

from protocol.secagg.errors import SecAggError
from protocol.secagg.shapes import KeyAdvert, Roster, SecAggConfig, UnmaskRequest

__all__ = ["KeyAdvert", "Roster", "SecAggConfig", "SecAggError", "UnmaskRequest"]
