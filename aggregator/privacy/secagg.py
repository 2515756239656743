"""The aggregator half of secure aggregation (SecAgg+): a sans-IO state machine for one round.

It relays public keys and sealed shares it cannot open, adds each masked vector into one
running sum as it arrives (no masked vector is kept, let alone an unmasked one), and at the
end rebuilds from the revealed shares the self masks of the survivors and the mask keys of the
agents that dropped after sharing, removes those masks, and returns the sum of the survivors'
updates. If some needed secret has fewer shares than its threshold, or fewer than
``min_survivors`` agents remain, :meth:`SecAggServer.finish` raises
:class:`~protocol.secagg.errors.SecAggError` and nothing is revealed.

Sets, as in the paper: U1 advertised keys, U2 sent shares, U3 sent a masked vector, U4 revealed.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from protocol.secagg import crypto, fixedpoint, shamir
from protocol.secagg.errors import SecAggError
from protocol.secagg.graph import neighbours
from protocol.secagg.shapes import KeyAdvert, Roster, SecAggConfig, UnmaskRequest

log = logging.getLogger(__name__)


class SecAggServer:
    """One round of secure aggregation over vectors of ``length`` ring elements (None: the
    first masked vector fixes it)."""

    def __init__(
        self, context: str, config: SecAggConfig, graph_seed: int, length: int | None = None
    ) -> None:
        self.context = context
        self.config = config
        self.graph_seed = graph_seed
        self.length = length
        self._adverts: dict[str, KeyAdvert] = {}
        self._graph: dict[str, list[str]] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}  # sender -> receiver -> sealed share
        self._sum = np.zeros(length or 0, dtype=np.uint64)
        self._masked: set[str] = set()
        self._request: UnmaskRequest | None = None
        self._revealed: dict[str, dict[str, bytes]] = {}  # owner -> holder -> tagged share

    # --- stage 1: keys ------------------------------------------------------------------------

    def on_advert(self, agent: str, advert: KeyAdvert) -> None:
        if self._graph:
            raise SecAggError(f"{agent} advertised keys after the roster went out")
        if len(advert.pk_c) != 32 or len(advert.pk_s) != 32 or advert.pk_c == advert.pk_s:
            raise SecAggError(f"{agent} advertised malformed keys")
        if advert in self._adverts.values():
            raise SecAggError(f"{agent} advertised another agent's keys")
        self._adverts[agent] = advert

    def rosters(self) -> dict[str, Roster]:
        """Close stage 1: each participant's roster (the participants and its neighbours' keys)."""
        self._need(len(self._adverts), "advertised keys")
        participants = tuple(sorted(self._adverts))
        self._graph = neighbours(participants, self.config.degree, self.graph_seed)
        return {
            a: Roster(participants, self.graph_seed, {p: self._adverts[p] for p in peers})
            for a, peers in self._graph.items()
        }

    # --- stage 2: shares ----------------------------------------------------------------------

    def on_shares(self, agent: str, sealed: dict[str, bytes]) -> None:
        if agent not in self._graph or self._request is not None:
            raise SecAggError(f"{agent} sent shares out of turn")
        if set(sealed) != set(self._graph[agent]):
            raise SecAggError(f"{agent} sent shares to other than its neighbours")
        self._sealed[agent] = dict(sealed)

    def inboxes(self) -> dict[str, dict[str, bytes]]:
        """Close stage 2: for each agent that shared, the sealed shares addressed to it."""
        self._need(len(self._sealed), "sent shares")
        return {
            a: {s: self._sealed[s][a] for s in self._graph[a] if s in self._sealed}
            for a in self._sealed
        }

    # --- stage 3: masked vectors --------------------------------------------------------------

    def on_masked(self, agent: str, masked: npt.NDArray[np.uint64]) -> None:
        if agent not in self._sealed or agent in self._masked or self._request is not None:
            raise SecAggError(f"{agent} sent a masked vector out of turn")
        if self.length is None and masked.ndim == 1 and not self._masked:
            self.length = masked.size
            self._sum = np.zeros(self.length, dtype=np.uint64)
        if masked.dtype != np.uint64 or masked.shape != (self.length,):
            raise SecAggError(f"{agent}'s masked vector is not {self.length} uint64 values")
        self._sum += masked  # wraps modulo 2**64, as the masks do
        self._masked.add(agent)

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 3: who survived (sent a masked vector) and who dropped after sharing."""
        self._need(len(self._masked), "sent masked vectors")
        dropped = sorted(set(self._sealed) - self._masked)
        self._request = UnmaskRequest(tuple(sorted(self._masked)), tuple(dropped))
        if dropped:
            log.info(
                "secure aggregation %s: %d agents dropped after sharing", self.context, len(dropped)
            )
        return self._request

    # --- stage 4: unmasking -------------------------------------------------------------------

    def on_revealed(self, agent: str, revealed: dict[str, bytes]) -> None:
        request = self._request
        if request is None or agent not in request.survivors:
            raise SecAggError(f"{agent} revealed shares out of turn")
        survivors, dropped = set(request.survivors), set(request.dropped)
        for owner, tagged in revealed.items():
            if owner not in self._graph[agent]:
                raise SecAggError(f"{agent} revealed a share of a non-neighbour")
            wanted = b"b" if owner in survivors else b"s" if owner in dropped else None
            if wanted is None or tagged[:1] != wanted:
                raise SecAggError(f"{agent} revealed the wrong kind of share of {owner}")
            self._revealed.setdefault(owner, {})[agent] = tagged[1:]

    def finish(self) -> npt.NDArray[np.float64]:
        """The survivors' summed update (float64), or :class:`SecAggError` if it cannot be had."""
        request = self._request
        if request is None:
            raise SecAggError("finish() before the unmask stage")
        length = self.length
        assert length is not None  # _need() saw at least one masked vector
        total = self._sum.copy()
        for owner in request.survivors:
            b = self._recover(owner, crypto.KEY_BYTES)
            total -= crypto.prg(b, length)
        survivors = set(request.survivors)
        for owner in request.dropped:
            key = crypto.private_from_bytes(self._recover(owner, crypto.KEY_BYTES))
            for peer in self._graph[owner]:
                if peer not in survivors:
                    continue
                seed = crypto.derive(key, self._adverts[peer].pk_s, "mask", self.context)
                pairwise = crypto.prg(seed, length)
                # the survivor added +PRG when its id sorts first, -PRG otherwise
                total = total - pairwise if peer < owner else total + pairwise
        self._revealed.clear()
        return fixedpoint.decode(total, self.config.fraction_bits)

    def _recover(self, owner: str, length: int) -> bytes:
        shares = self._revealed.get(owner, {})
        t = self.config.threshold(len(self._graph[owner]))
        if len(shares) < t:
            raise SecAggError(
                f"secure aggregation failed: {len(shares)} shares of {owner}'s secret revealed, "
                f"{t} needed (too many agents dropped out)"
            )
        return shamir.combine(list(shares.values()), t, length)

    def _need(self, count: int, what: str) -> None:
        if count < self.config.min_survivors:
            raise SecAggError(
                f"secure aggregation failed: {count} agents {what}, "
                f"{self.config.min_survivors} needed (too many agents dropped out)"
            )
