"""FedBiOT in a regional tier: hold the emulator and its alignment chain, serve them per agent.

To its upstream a region is one agent: the upstream's :class:`FedbiotServer` sends it the bundle
once (by ``Hello.holds``), alignment deltas from the version it holds and the global adapter,
and takes its update as any agent's. The region keeps what it is sent as an agent would: the
bundle and its current alignment state in the upstream link's object store (so its Hello
lists them after a restart), and the deltas it was sent, so that it can serve its own agents
what each of them lacks (:class:`~aggregator.methods.fedbiot.serve.EmulatorCopies`, the
server's own bookkeeping): the bundle only to an agent that does not hold it, deltas from that
agent's version (or the whole state when the region does not have the deltas). Every state is
checked against the upstream's sha256, so a region's agents hold exactly the upstream's
emulator, bit for bit.

Aggregation is FedAvg of LoRA factors, an example-weighted mean: the region answers with its
agents' mean (:class:`aggregator.tier.relay.MeanRelay`) and their total, and the upstream's mean of
regional means is the flat mean. Only updates trained on the task's emulator and alignment
version are taken.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregator.errors import ConfigError, StateError
from aggregator.methods import AgentView, Assignment, MethodContext, Update
from aggregator.methods.fedbiot.serve import EmulatorCopies
from aggregator.tier.relay import UPSTREAM_OBJECTS, RelayMethod
from edge_agent.daemon.objects import ObjectStore
from protocol.errors import ProtocolError
from protocol.frames import Buffer
from protocol.messages import TaskResult
from protocol.methods import parse_params
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st

log = logging.getLogger(__name__)


class FedbiotRelay(RelayMethod):
    """The mean relay, plus the emulator and alignment chain it serves per agent."""

    def __init__(self, params: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(spec.NAME)
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        if context.state_dir is None:
            raise ConfigError("a fedbiot regional tier needs a state_dir for the emulator")
        self.params: spec.Params = parsed
        self.objects = ObjectStore(Path(context.state_dir) / UPSTREAM_OBJECTS)
        self.copies = EmulatorCopies(parsed.align.history)
        self._targets: dict[str, tuple[int, int]] = {}

    # --- what the upstream sends --------------------------------------------------------------

    def set_task(self, kind: str, round: int, assignment: Assignment) -> None:
        parsed = parse_params(spec.NAME, assignment.params)
        assert isinstance(parsed, spec.Params)
        info = parsed.task
        if info is None:
            raise StateError("fedbiot: the upstream's task names no emulator")
        self.params = parsed
        self.copies.history = parsed.align.history
        self.copies.part_bytes = parsed.emulator.part_mb << 20
        try:
            bundle = spec.bundle_of(assignment.blobs)
        except ProtocolError as exc:
            raise StateError(f"fedbiot: the upstream's emulator parts: {exc}") from None
        self._take_bundle(info, bundle)
        self._take_alignment(info, assignment.blobs.get(spec.ALIGN_BLOB))
        shared = {k: v for k, v in assignment.blobs.items() if k == spec.GLOBAL_BLOB}
        plain = Assignment(params=assignment.params, blobs=shared, quant=assignment.quant)
        super().set_task(kind, round, plain)  # the emulator and alignment go per agent

    def _take_bundle(self, info: spec.TaskInfo, data: Buffer | None) -> None:
        sha = info.emulator_sha256
        if sha == self.copies.bundle_sha:
            return
        if data is not None:
            data = bytes(data)
            got = self.objects.put(data)
            if got != sha:
                self.objects.discard(got)
                raise StateError("fedbiot: the upstream's emulator blob does not have its sha256")
        else:
            data = self.objects.get(sha)
            if data is None:
                raise StateError(
                    f"fedbiot: this region does not hold emulator {sha[:12]}…; restart it so that "
                    "its Hello asks the upstream for the emulator again"
                )
        try:
            bundle = emu.decode_bundle(data)
        except ProtocolError as exc:
            raise StateError(f"fedbiot: the upstream's emulator is not valid: {exc}") from None
        shapes = {n: tuple(t.shape) for n, t in bundle.tensors.items()}
        targets = st.align_targets(shapes, bundle.plan.n_emulator, self.params.align.target_modules)
        if self.copies.bundle_sha:
            self.objects.discard(self.copies.bundle_sha)  # a new run's emulator replaces it
        self.copies.set_bundle(data, sha)
        self.copies.set_chain(0, None, {}, {})
        self._targets = targets
        log.info("fedbiot: region holds emulator %s… (%.1f MB)", sha[:12], len(data) / 1e6)

    def _take_alignment(self, info: spec.TaskInfo, raw: Buffer | None) -> None:
        """Bring the region's chain to the task's version; keep the deltas it was sent."""
        c, a = self.copies, self.params.align
        held_sha = c.shas.get(c.version) if c.state is not None else None
        if c.version == info.align_version and held_sha == info.align_sha256:
            return
        shas, deltas = dict(c.shas), dict(c.deltas)
        current = (c.version, c.state) if c.state is not None else None
        try:
            version, state, blob = st.reach(
                info.align_version,
                info.align_sha256,
                raw,
                self._targets,
                (a.r, a.seed),
                current,
                self.objects.get,
            )
        except (st.NotHeld, ProtocolError) as exc:
            raise StateError(f"fedbiot: the upstream's alignment: {exc}") from None
        if blob is None or blob.kind != "deltas":
            shas, deltas = {}, {}  # a whole state (or one held): no chain to serve from
        else:
            sent = dict(zip(blob.versions, blob.shas, strict=True))
            if any(shas.get(v, s) != s for v, s in sent.items()):
                shas, deltas = {}, {}
            shas.update(sent)
            deltas.update(blob.deltas)
        data = st.state_bytes(state, version)
        sha = self.objects.put(data)
        if version != info.align_version or sha != info.align_sha256:
            self.objects.discard(sha)
            raise StateError(f"fedbiot: alignment state v{version} does not match the task's")
        if held_sha and held_sha != sha:
            self.objects.discard(held_sha)
        shas[version] = sha
        c.set_chain(version, state, shas, deltas)

    # --- toward the region's agents -----------------------------------------------------------

    def on_hello(self, view: AgentView) -> None:
        self.copies.on_hello(view)

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        shared = super().assign(round, agent_id, kind)
        blobs = {**self.copies.blobs_for(agent_id), **shared.blobs}
        return Assignment(params=shared.params, blobs=blobs, quant=shared.quant)

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        return self.copies.take_notes()

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        c = self.copies
        want = {"fedbiot.emulator": c.bundle_sha, "fedbiot.align": c.shas.get(c.version, "")}
        update = self.mean.decode(round, result, blobs, want_meta=want)
        c.saw_update(result.agent_id, want)
        return update

    # --- aggregation: the mean relay's, with what was sent per agent -----------------------

    def finish_round(self, round: int) -> dict[str, float]:
        bundles, align_bytes = self.copies.take_counts()
        sent = {"bundle_sent": float(bundles), "align_KB_sent": round_kb(align_bytes)}
        return {**super().finish_round(round), **sent}


def round_kb(n: int) -> float:
    return float(round(n / 1e3, 1))
