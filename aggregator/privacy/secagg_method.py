"""Secure aggregation around a server method: the aggregator sees only each round's sum.

:class:`SecureServer` wraps a method whose server step is an example-weighted sum (fedit,
SLoRA, Ferret's coefficient grid) and
runs the SecAgg+ stages of each training round through the engine's ordinary phases
(:mod:`protocol.secagg.wire`): two ``score`` phases before training (advertise keys, share),
the training phase (masked vectors, summed as they arrive by
:class:`~aggregator.privacy.secagg.SecAggServer`), and one ``score`` phase after it (unmask), which the
engine opens when :meth:`SecureServer.reveal_agents` names the survivors. Only then does the
wrapped method get one update: the unmasked weighted sum divided by the survivors' examples.

A method may add three optional hooks: ``secure_layout(round)`` (the exact masked layout it
expects, when the task fixes it), ``check_masked(round, result)`` (its checks of what a masked
result still shows: metrics, example count) and ``secure_payload(round, mean)`` (the payload
its own ``validate`` takes for the unmasked mean, when the mean is not simply the sent tensors).
Ferret has all three (:mod:`protocol.methods.ferret.grid`).

Nothing individual is stored: a masked result has no ``update`` blob, so the intake writes no
payload and the ledger keeps only its row (agent, examples, metrics). If the round cannot be
unmasked (too many dropouts) it is logged, reported as ``secagg_failed`` and the global state
stays as it was.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from aggregator.errors import UpdateRejected
from aggregator.methods import Assignment, ServerMethod, Update
from aggregator.methods.robust import check_examples
from aggregator.privacy.secagg import SecAggServer
from protocol import payloads
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import TaskResult
from protocol.secagg import wire
from protocol.secagg.errors import SecAggError
from protocol.secagg.shapes import (
    Roster,
    SecAggConfig,
    UnmaskRequest,
    advert_from_params,
    request_to_params,
    roster_to_params,
    sealed_from_params,
    sealed_to_params,
)

log = logging.getLogger(__name__)


class SecureServer:
    """A server method whose training rounds go through SecAgg+."""

    def __init__(self, inner: ServerMethod, config: SecAggConfig, *, max_weight: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = config
        self.max_weight = max_weight
        self._stage = "idle"
        self._round = 0
        self._context = ""
        self._server = SecAggServer("", config, 0)
        self._rosters: dict[str, Roster] = {}
        self._inboxes: dict[str, dict[str, bytes]] = {}
        self._request: UnmaskRequest | None = None
        self._pending: dict[str, npt.NDArray[np.uint64]] = {}
        self._layout: wire.Layout | None = None
        self._examples = 0
        self.failures = 0

    # --- the round's stages -------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self.inner.begin_round(round)
        self._round = round
        self._context = f"r{round}-{secrets.token_hex(8)}"
        self._server = SecAggServer(self._context, self.config, secrets.randbits(62))
        self._stage = "advertise"
        self._rosters, self._inboxes, self._request = {}, {}, None
        self._pending, self._layout, self._examples = {}, None, 0

    def task_label(self, kind: str, label: str) -> str:
        """Task ids of this round attempt's phases: a result from before a restart (whose
        keys are gone) is then stale, not a duplicate that would never be counted."""
        return f"{label}.{self._context[-8:]}" if self._context else label

    def wants_score(self, round: int) -> bool:
        return round == self._round and self._stage in ("advertise", "share")

    def _entry(self, agent_id: str, stage: str, **data: Any) -> dict[str, Any]:
        return {
            "stage": stage,
            "agent": agent_id,
            "context": self._context,
            "config": self.config.model_dump(mode="json"),
            **data,
        }

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        if kind == "eval":
            return self.inner.assign(round, agent_id, kind)
        base = self.inner.assign(round, agent_id, "train")
        if kind == "score":  # a stage: method parameters to validate, no payload
            if self._stage == "share":
                roster = self._rosters.get(agent_id)
                data = {"roster": roster_to_params(roster)} if roster is not None else {}
                entry = self._entry(agent_id, "share" if roster else "excluded", **data)
            elif self._stage == "unmask" and self._request is not None:
                entry = self._entry(agent_id, "unmask", request=request_to_params(self._request))
            else:
                entry = self._entry(agent_id, "advertise")
            return Assignment(params={**base.params, wire.PARAM: entry}, quant=base.quant)
        inbox = self._inboxes.get(agent_id) if self._stage == "train" else None
        if inbox is None:
            entry = self._entry(agent_id, "excluded")
        else:
            entry = self._entry(agent_id, "mask", inbox=sealed_to_params(inbox))
        return Assignment(
            params={**base.params, wire.PARAM: entry}, blobs=base.blobs, quant=base.quant
        )

    def add_score(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> None:
        try:
            if set(blobs) != {wire.BLOB}:
                raise SecAggError(f"expected one blob {wire.BLOB!r}, got {sorted(blobs)}")
            body = wire.load_json(blobs[wire.BLOB])
            if not isinstance(body, dict):
                raise SecAggError("a stage answer must be a JSON object")
            agent = result.agent_id
            if self._stage == "advertise":
                self._server.on_advert(agent, advert_from_params(body))
            elif self._stage == "share":
                self._server.on_shares(agent, sealed_from_params(body.get("sealed")))
            elif self._stage == "unmask":
                self._server.on_revealed(agent, sealed_from_params(body.get("revealed")))
            else:
                raise SecAggError(f"no stage answer expected now ({self._stage})")
        except SecAggError as exc:
            raise UpdateRejected(exc.code, str(exc)) from None

    def finish_score(self, round: int) -> dict[str, float]:
        try:
            if self._stage == "advertise":
                self._rosters = self._server.rosters()
                self._stage = "share"
                return {"secagg_agents": float(len(self._rosters))}
            if self._stage == "share":
                self._inboxes = self._server.inboxes()
                self._stage = "train"
                return {}
            if self._stage == "unmask":
                self._stage = "done"
                total = self._server.finish()
                self._feed(total)
                return {
                    "secagg_survivors": float(len(self._request.survivors) if self._request else 0)
                }
        except SecAggError as exc:
            self._fail(exc)
            return {"secagg_failed": 1.0}
        return {}

    def _fail(self, exc: SecAggError) -> None:
        self._stage = "failed"
        self.failures += 1
        log.error("round %d: %s; the global state stays as it was", self._round, exc)

    def reveal_agents(self, round: int) -> list[str] | None:
        """After the training phase closed: the agents asked to reveal shares (None: no
        unmask phase is due, e.g. the round already failed)."""
        if round != self._round or self._stage != "train":
            return None
        try:
            self._request = self._server.unmask_request()
        except SecAggError as exc:
            self._fail(exc)
            return None
        self._stage = "unmask"
        return list(self._request.survivors)

    # --- masked results -----------------------------------------------------------------------

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        try:
            if self._stage != "train":
                raise SecAggError(f"no masked result expected now ({self._stage})")
            if set(blobs) != {wire.MASKED_BLOB, wire.LAYOUT_BLOB}:
                raise SecAggError(f"a masked result holds {sorted(blobs)}, not masked + layout")
            layout = wire.layout_from(blobs[wire.LAYOUT_BLOB])
            self._check_layout(layout)
            vector = wire.vector_from(blobs[wire.MASKED_BLOB], layout.length)
        except SecAggError as exc:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, str(exc)) from None
        check_examples(result.num_examples, self.max_weight)
        check = getattr(self.inner, "check_masked", None)
        if check is not None:  # the method's checks of what a masked result still shows
            check(round, result)
        self._pending[result.task_id] = vector
        return Update(
            result.agent_id, result.task_id, result.num_examples, {}, dict(result.metrics)
        )

    def _check_layout(self, layout: wire.Layout) -> None:
        if self._layout is None:
            expected = getattr(self.inner, "secure_layout", None)
            # a method that derives the whole layout from the task (Ferret's grid)
            if expected is not None and layout != expected(self._round):
                raise SecAggError("the masked layout differs from the round's grid")
            current: dict[str, torch.Tensor] = getattr(self.inner, "global_state", {})
            ours = sorted((k, tuple(v.shape)) for k, v in current.items())
            if current and layout.entries != ours:
                raise SecAggError("the masked layout differs from the global adapter's")
            known = getattr(self.inner, "known_layout", None)  # from run.model_dir
            if not current and known and layout.entries != sorted(known.items()):
                raise SecAggError("the masked layout differs from the model's adapter layout")
            # else (round 1, no model_dir) the first masked layout is the round's: masked
            # vectors cannot be told apart by content, so they cannot be voted on
            self._layout = layout
        elif layout != self._layout:
            raise SecAggError("the masked layout differs from the round's")

    def add(self, update: Update) -> None:
        vector = self._pending.pop(update.task_id)
        try:
            self._server.on_masked(update.agent_id, vector)
        except SecAggError as exc:
            raise UpdateRejected(exc.code, str(exc)) from None
        # as the agent weighed it (DpServer has set num_examples to 1 already)
        self._examples += wire.masked_weight(update.num_examples, update.metrics, dp=False)

    def _feed(self, total: npt.NDArray[np.float64]) -> None:
        """Hand the wrapped method the survivors' example-weighted mean as one update, encoded
        as the agents' own payloads were and checked by the method's own ``validate``."""
        layout = self._layout
        assert layout is not None
        if self._examples <= 0:
            return
        # the server cannot check a masked vector, but it can check the sum: agents that clip
        # to ±clip_range before weighting send a sum within ±clip_range x their weights (plus
        # the fixed-point rounding); beyond it, one of them did not clip, or altered its masked
        # vector: the round is dropped (who did it cannot be told)
        rounding = len(self._request.survivors if self._request else ()) + 1
        limit = self.config.clip_range * self._examples + rounding * 2.0**-self.config.fraction_bits
        if total.size and float(np.max(np.abs(total))) > limit * (1 + 1e-9):
            raise SecAggError(
                f"the unmasked sum reaches {float(np.max(np.abs(total))):.4g}, beyond what "
                f"agents within clip_range {self.config.clip_range:g} can send ({limit:.4g} for "
                f"weights {self._examples}): an agent did not clip its update or altered its "
                "masked vector"
            )
        secure_payload = getattr(self.inner, "secure_payload", None)
        try:
            if secure_payload is not None:  # the method re-encodes the mean itself (Ferret)
                blob = secure_payload(self._round, total / self._examples)
            else:
                tensors, offset = {}, 0
                for name, shape in layout.entries:
                    size = int(np.prod(shape))
                    mean = total[offset : offset + size] / self._examples
                    tensors[name] = torch.from_numpy(mean.reshape(shape)).to(torch.float32)
                    offset += size
                blob = payloads.encode(
                    layout.kind, tensors, method=self.name, round=self._round, meta=layout.meta
                )
        except ProtocolError as exc:
            raise SecAggError(f"the unmasked aggregate is not a valid payload: {exc}") from None
        cap = getattr(
            getattr(getattr(self.inner, "params", None), "aggregation", None), "max_examples", None
        )
        result = TaskResult(
            round=self._round,
            task_id=f"secagg-r{self._round}",
            agent_id="secagg",
            method=self.name,
            num_examples=min(self._examples, cap or self._examples),
        )
        try:
            update = self.inner.validate(self._round, result, {"update": memoryview(blob)})
        except UpdateRejected as exc:
            raise SecAggError(f"the method refused the unmasked aggregate: {exc.reason}") from None
        self.inner.add(update)

    def finish_round(self, round: int) -> dict[str, float]:
        return {**self.inner.finish_round(round), "secagg_failures": float(self.failures)}

    # --- everything else is the wrapped method's -----------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.inner.state()

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.inner.restore(tensors, meta)

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        return self.inner.export(out_dir, base_model_name=base_model_name)

    def __getattr__(self, name: str) -> Any:  # optional hooks (admit, on_hello, plan...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)
