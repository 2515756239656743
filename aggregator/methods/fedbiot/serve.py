"""What each agent holds of FedBiOT's emulator, and what brings it to the current version.

Used by the server (which builds and aligns the emulator) and by a regional tier (which gets
both from its upstream and serves its own agents). What an agent holds is known from its Hello
(``holds``: the bundle and its alignment state by sha256), from its accepted updates (their
metadata name the emulator), and from what it was sent; an agent that lost something says so in
its next Hello, which resets what is known of it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from aggregator.methods import AgentView
from protocol.frames import Buffer
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st

State = dict[str, torch.Tensor]


class EmulatorCopies:
    """The bundle, the alignment chain (version, state, recent shas and deltas) and, per agent,
    what it holds; :meth:`blobs_for` gives an agent what it lacks. Thread-safe."""

    def __init__(self, history: int, part_bytes: int = 512 << 20) -> None:
        self.lock = threading.Lock()
        self.history = history
        self.part_bytes = part_bytes
        """A bundle larger than this travels in parts (``spec.bundle_blobs``)."""
        self.bundle = b""
        self.bundle_sha = ""
        self._parts: tuple[int, dict[str, Buffer]] | None = None
        """The bundle's blobs at a part size: the same objects every send (hashed once)."""
        self.version = 0
        self.state: State | None = None
        self.shas: dict[int, str] = {}
        self.deltas: dict[int, State] = {}
        self._blobs: dict[tuple[int, int], bytes] = {}
        self._holds: dict[str, frozenset[str]] = {}
        self._has_bundle: set[str] = set()
        self._version_of: dict[str, int] = {}
        self._sent: dict[str, dict[str, str]] = {}
        self.sent_bundles = 0
        self.sent_align = 0

    # --- the emulator and its chain -------------------------------------------------------------

    def set_bundle(self, data: bytes, sha: str) -> None:
        with self.lock:
            if sha != self.bundle_sha:
                self._has_bundle.clear()
            self.bundle, self.bundle_sha, self._parts = data, sha, None

    def set_chain(
        self,
        version: int,
        state: State | None,
        shas: Mapping[int, str],
        deltas: Mapping[int, State],
    ) -> None:
        """Replace the chain (a build, a checkpoint, an upstream's whole state)."""
        with self.lock:
            self.version, self.state = version, state
            self.shas, self.deltas = dict(shas), dict(deltas)
            self._prune()
            self._blobs.clear()

    def _prune(self) -> None:
        for old in [d for d in self.deltas if d <= self.version - self.history]:
            del self.deltas[old]
        for old in [s for s in self.shas if s < self.version - self.history]:
            del self.shas[old]

    def add_version(self, version: int, state: State, sha: str, delta: State | None) -> None:
        """Version ``version`` follows the current one (``delta``: the bf16 change, when known)."""
        with self.lock:
            self.version, self.state = version, state
            self.shas[version] = sha
            if delta is not None:
                self.deltas[version] = delta
            self._prune()
            self._blobs.clear()

    def task_info(self) -> spec.TaskInfo:
        with self.lock:
            return spec.TaskInfo(
                emulator_sha256=self.bundle_sha,
                align_version=self.version,
                align_sha256=self.shas[self.version],
            )

    # --- what agents hold -----------------------------------------------------------------------

    def on_hello(self, view: AgentView) -> None:
        with self.lock:
            self._holds[view.agent_id] = view.holds
            self._has_bundle.discard(view.agent_id)
            self._version_of.pop(view.agent_id, None)

    def _known(self, agent_id: str) -> None:
        """Fold a Hello's ``holds`` into what is known of the agent (needs the bundle's sha)."""
        holds = self._holds.pop(agent_id, None)
        if holds is None:
            return
        if self.bundle_sha in holds:
            self._has_bundle.add(agent_id)
        held = [v for v, sha in self.shas.items() if sha in holds]
        if held:
            self._version_of[agent_id] = max(held)

    def saw_update(self, agent_id: str, meta: Mapping[str, str]) -> None:
        """An accepted update names the emulator and alignment state it was trained on."""
        with self.lock:
            if meta.get("fedbiot.emulator") == self.bundle_sha:
                self._has_bundle.add(agent_id)
            trained_on = [v for v, s in self.shas.items() if s == meta.get("fedbiot.align")]
            if trained_on:
                self._version_of[agent_id] = trained_on[0]

    def _align_blob(self, have: int | None) -> bytes | None:
        """What brings an agent at version ``have`` (None: nothing) to the current version."""
        t = self.version
        if t == 0:
            return None  # version 0 is seeded: every agent makes it itself
        base = 0 if have is None or have > t else have
        key = (base, t)
        if key not in self._blobs:
            assert self.state is not None
            whole = st.state_bytes(self.state, t)
            chain = range(base + 1, t + 1)
            if all(v in self.deltas for v in chain) and all(v in self.shas for v in (base, *chain)):
                parts = {v: self.deltas[v] for v in chain}
                deltas = st.encode_deltas(parts, base, [self.shas[v] for v in (base, *chain)])
                whole = min(whole, deltas, key=len)
            self._blobs[key] = whole
        return self._blobs[key]

    def blobs_for(self, agent_id: str) -> dict[str, Buffer]:
        """The bundle if the agent lacks it, the alignment blob if it is behind; noted as sent."""
        with self.lock:
            self._known(agent_id)
            blobs: dict[str, Buffer] = {}
            notes = self._sent.setdefault(agent_id, {})
            if agent_id not in self._has_bundle:
                if self._parts is None or self._parts[0] != self.part_bytes:
                    self._parts = (self.part_bytes, spec.bundle_blobs(self.bundle, self.part_bytes))
                blobs.update(self._parts[1])
                self._has_bundle.add(agent_id)
                self.sent_bundles += 1
                notes["emulator"] = f"sent ({len(self.bundle) / 1e6:.1f} MB)"
            have = self._version_of.get(agent_id)
            if have != self.version:
                blob = self._align_blob(have)
                if blob is not None:
                    blobs[spec.ALIGN_BLOB] = blob
                    self.sent_align += len(blob)
                    notes["align"] = f"v{have if have is not None else '-'}→v{self.version}"
                self._version_of[agent_id] = self.version
            return blobs

    def take_notes(self) -> dict[str, dict[str, str]]:
        """Per agent, what was sent since the last call (the round table's details)."""
        with self.lock:
            sent, self._sent = self._sent, {}
        return sent

    def take_counts(self) -> tuple[int, int]:
        """(bundles sent, alignment bytes sent) since the last call."""
        with self.lock:
            counts = (self.sent_bundles, self.sent_align)
            self.sent_bundles = self.sent_align = 0
        return counts
