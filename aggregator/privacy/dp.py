"""Client-level DP-FedAvg on the aggregator: noise levels, central noise and ε accounting.

DP-FedAvg (McMahan et al. 2018) with the adjacency "one agent's whole data": each agent's
update is clipped to ‖Δ‖₂ ≤ C (by the agent, :mod:`edge_agent.privacy.dp`), updates are averaged with
equal weights, and Gaussian noise of standard deviation σ·C is added to their sum:

* ``central``: the aggregator adds it to the sum (without secure aggregation), or each of the
  ``m`` agents of the round adds a share N(0, σ²C²/m) (with it: distributed noise; agents that
  drop out take their share with them, so the sum then carries somewhat less);
* ``local``: every agent adds N(0, σ²C²) to its own clipped update before it leaves.

Accounting uses Google's ``dp-accounting`` (RDP accountant). Central: per round a Gaussian
mechanism of noise multiplier σ, Poisson-subsampled with q = the run's ``fraction`` (edgefed
samples a fixed-size set, so this is the usual approximation), composed over the rounds. Local:
what one agent's released updates cost it, a Gaussian mechanism with sensitivity 2C (two of
its possible clipped updates differ by up to 2C), so multiplier σ/2, composed over the rounds
with no subsampling. ε is reported at the run's δ.
"""

from __future__ import annotations

import math
from functools import cache

from dp_accounting import dp_event, mechanism_calibration, rdp


def _event(mode: str, sigma: float, q: float, rounds: int) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(sigma / 2 if mode == "local" else sigma)
    step: dp_event.DpEvent = gaussian
    if mode == "central" and q < 1.0:
        step = dp_event.PoissonSampledDpEvent(q, gaussian)
    return dp_event.SelfComposedDpEvent(step, rounds)


@cache
def epsilon(mode: str, sigma: float, q: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` rounds at ``delta`` (0 rounds: 0)."""
    if rounds <= 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(_event(mode, sigma, q, rounds))
    return float(accountant.get_epsilon(delta))


def calibrate(mode: str, target_epsilon: float, q: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier σ whose ``rounds`` rounds stay within ``target_epsilon``."""
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda s: _event(mode, s, q, rounds),
        target_epsilon,
        delta,
        mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(sigma)


def agent_noise_std(mode: str, sigma: float, clip: float, secure: bool, agents: int) -> float:
    """The noise each agent adds itself: all of it (local), its share (central under secure
    aggregation) or none (central: the aggregator adds it)."""
    if mode == "local":
        return sigma * clip
    if secure:
        return sigma * clip / math.sqrt(max(agents, 1))
    return 0.0
