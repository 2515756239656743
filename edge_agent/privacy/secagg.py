"""The agent half of secure aggregation (SecAgg+): a sans-IO state machine for one round.

Stages, each called once and in order (anything else raises
:class:`~protocol.secagg.errors.SecAggError`):

1. :meth:`SecAggClient.advertise` — make two X25519 key pairs and a self-mask seed ``b``.
2. :meth:`SecAggClient.share` — given the roster, Shamir-share ``b`` and the mask private key
   among its graph neighbours, each share sealed for one neighbour (ChaCha20-Poly1305 under
   an X25519+HKDF key), so the aggregator that relays them cannot read them.
3. :meth:`SecAggClient.mask` — open the shares addressed to it, then mask its fixed-point
   update: ``y = x + PRG(b) + Σ_j ±PRG(s_ij)`` (+ when its id sorts before j's) over the neighbours that shared.
4. :meth:`SecAggClient.unmask` — reveal, per neighbour, the ``b`` share of a survivor or the
   mask-key share of a dropped agent, never both for one agent.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from protocol.secagg import crypto, fixedpoint, shamir
from protocol.secagg.errors import SecAggError
from protocol.secagg.graph import neighbours
from protocol.secagg.shapes import KeyAdvert, Roster, SecAggConfig, UnmaskRequest

_STAGES = ("advertise", "share", "mask", "unmask", "done")


def aad(sender: str, receiver: str, context: str) -> bytes:
    """Associated data of a sealed share: who sent it to whom, in which run and round."""
    return f"{sender}->{receiver} {context}".encode()


class SecAggClient:
    """One agent's secure-aggregation state for one round (``context`` = run and round)."""

    def __init__(self, agent_id: str, context: str, config: SecAggConfig) -> None:
        self.agent_id = agent_id
        self.context = context
        self.config = config
        self._stage = 0
        self._c = crypto.new_private_key()
        self._s = crypto.new_private_key()
        self._b = os.urandom(crypto.KEY_BYTES)
        self._neighbours: list[str] = []
        self._keys: dict[str, KeyAdvert] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (b share, s share)
        self._masked_with: list[str] = []

    def _enter(self, stage: str) -> None:
        if _STAGES[self._stage] != stage:
            raise SecAggError(f"secure aggregation: {stage} asked during {_STAGES[self._stage]}")
        self._stage += 1

    def advertise(self) -> KeyAdvert:
        self._enter("advertise")
        return KeyAdvert(crypto.public_bytes(self._c), crypto.public_bytes(self._s))

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Sealed shares, one per neighbour, keyed by the neighbour's id."""
        self._enter("share")
        if self.agent_id not in roster.participants:
            raise SecAggError("the roster leaves this agent out")
        mine = neighbours(roster.participants, self.config.degree, roster.graph_seed)
        self._neighbours = mine[self.agent_id]
        if set(roster.keys) != set(self._neighbours):
            raise SecAggError("the roster's keys are not this agent's graph neighbours")
        if len(roster.participants) < self.config.min_survivors:
            raise SecAggError(f"only {len(roster.participants)} agents in the round")
        self._keys = dict(roster.keys)
        count = len(self._neighbours)
        t = self.config.threshold(count)
        b_shares = shamir.split(self._b, count, t)
        s_shares = shamir.split(crypto.private_bytes(self._s), count, t)
        sealed = {}
        for index, peer in enumerate(self._neighbours):
            key = crypto.derive(self._c, self._keys[peer].pk_c, "share", self.context)
            plain = b_shares[index] + s_shares[index]
            sealed[peer] = crypto.seal(key, plain, aad(self.agent_id, peer, self.context))
        return sealed

    def mask(
        self, inbox: dict[str, bytes], update: npt.NDArray[np.floating], weight: int = 1
    ) -> npt.NDArray[np.uint64]:
        """The masked fixed-point ``weight × update``, given the sealed shares the neighbours
        sent it; every value of ``update`` must lie within ``±clip_range``."""
        self._enter("mask")
        strangers = set(inbox) - set(self._neighbours)
        if strangers:
            raise SecAggError(f"shares from non-neighbours: {sorted(strangers)[:3]}")
        t = self.config.threshold(len(self._neighbours))
        if len(inbox) < t:
            raise SecAggError(f"{len(inbox)} neighbours shared, {t} needed to unmask later")
        size = shamir.SHARE_BYTES
        for peer, sealed in inbox.items():
            key = crypto.derive(self._c, self._keys[peer].pk_c, "share", self.context)
            plain = crypto.open_sealed(key, sealed, aad(peer, self.agent_id, self.context))
            if len(plain) != 2 * size:
                raise SecAggError(f"a share from {peer} has the wrong length")
            self._held[peer] = (plain[:size], plain[size:])
        values = np.asarray(update, dtype=np.float64)
        fixedpoint.encode(values, self.config.clip_range, 0)  # the range check, unweighted
        bound = self.config.clip_range * weight
        masked = fixedpoint.encode(values * weight, bound, self.config.fraction_bits)
        masked = masked + crypto.prg(self._b, masked.size)
        for peer in sorted(inbox):
            seed = crypto.derive(self._s, self._keys[peer].pk_s, "mask", self.context)
            pairwise = crypto.prg(seed, masked.size)
            masked = masked + pairwise if self.agent_id < peer else masked - pairwise
        self._masked_with = sorted(inbox)
        return masked

    def unmask(self, request: UnmaskRequest) -> dict[str, bytes]:
        """The shares the aggregator may have: ``b`` of survivors, the mask key of dropouts."""
        self._enter("unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError("an agent is listed as both survivor and dropped")
        if self.agent_id not in survivors:
            raise SecAggError("the unmask request lists this agent as dropped")
        if len(survivors) < self.config.min_survivors:
            raise SecAggError(f"only {len(survivors)} survivors: the sum would reveal too much")
        revealed = {}
        for peer, (b_share, s_share) in self._held.items():
            if peer in survivors:
                revealed[peer] = b"b" + b_share
            elif peer in dropped:
                revealed[peer] = b"s" + s_share
        self._b = b""  # the self mask is spent: it is never needed again
        return revealed
