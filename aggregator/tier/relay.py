"""The server half a regional tier's engine runs: forward the upstream's task, aggregate what returns.

A *relay* is a server method (``aggregator.methods.ServerMethod``) with two more members that
:class:`aggregator.tier.regional.Region` uses:

``set_task(kind, round, assignment)``
    The upstream's task for this region (its params, blobs and precision), before the regional
    engine opens the phase that answers it.
``answers``
    An :class:`Answers`: what the region sends back for each closed phase (blobs and the
    region's example total), so that a re-sent upstream task is answered without a new phase.

:class:`RelayMethod` serves every method whose aggregation is an example-weighted mean of what
agents send (fedit, SLoRA's two stages, Ferret's coefficients): it sends each agent exactly the
upstream's task and answers with the mean of its agents' updates, in the same payload kind,
with ``num_examples`` = the region's total. The upstream's weighted mean of regional means
weighted by regional totals is the flat weighted mean of every agent:
``Σ_R W_R · (Σ_{a∈R} w_a x_a / W_R) / Σ_R W_R = Σ_a w_a x_a / Σ_a w_a``. Ferret's triples
are merged by (group, seed): an agent that did not pick a pair adds 0, as on the upstream.

FedPipe and FedBiOT send each agent something of its own (ranks and a truncated ΔW; the
emulator and alignment deltas from the version it holds), so they have relays of their own:
:mod:`aggregator.methods.fedpipe.relay` (FedPipe's server, planning the region's agents and
answering with its mean ΔW) and :mod:`aggregator.methods.fedbiot.relay` (this mean relay plus
the emulator and alignment chain served per agent). A region may also apply its own robust
rule (``[method.aggregation]``) over its agents: :class:`MeanRelay`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from aggregator.engine.rounds import TRUNCATION_KEYS, truncation_totals, weighted
from aggregator.errors import ConfigError, UpdateRejected
from aggregator.methods import Assignment, ServerMethod, Update
from aggregator.methods.robust import Aggregator, check_examples
from protocol import payloads
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import TaskResult
from protocol.methods._common import AggregationParams

UPDATE_BLOB = "update"
UPSTREAM_OBJECTS = "upstream-objects"
"""Under the region's state_dir: the large objects its upstream link holds (``Hello.holds``)."""
_ANSWER = "relay.answer."


class Answers:
    """The region's answer per closed phase: ``(blobs, examples)``; the newest train answer is
    part of the region's checkpoint (:meth:`state`), so a restarted region still has it."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, int], tuple[dict[str, bytes], int]] = {}

    def put(self, kind: str, round: int, blobs: Mapping[str, bytes], examples: int) -> None:
        self._done = {k: v for k, v in self._done.items() if k[1] >= round - 1}
        self._done[(kind, round)] = (dict(blobs), examples)

    def drop(self, kind: str, round: int) -> None:
        self._done.pop((kind, round), None)

    def get(self, kind: str, round: int) -> tuple[dict[str, bytes], int] | None:
        return self._done.get((kind, round))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        trains = [k for k in self._done if k[0] == "train"]
        if not trains:
            return {}, {}
        key = max(trains, key=lambda k: k[1])
        blobs, examples = self._done[key]
        tensors = {
            _ANSWER + name: torch.frombuffer(bytearray(data), dtype=torch.uint8)
            for name, data in blobs.items()
        }
        return tensors, {"answer_round": str(key[1]), "answer_examples": str(examples)}

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        blobs = {
            k[len(_ANSWER) :]: bytes(v.numpy().tobytes())
            for k, v in tensors.items()
            if k.startswith(_ANSWER)
        }
        if blobs and "answer_round" in meta:
            self.put("train", int(meta["answer_round"]), blobs, int(meta["answer_examples"]))


class Relay(ServerMethod, Protocol):
    answers: Answers

    def set_task(self, kind: str, round: int, assignment: Assignment) -> None: ...


@dataclass
class RegionRound:
    """What the region has made of one upstream round."""

    kind: payloads.PayloadKind
    method: str
    meta: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    tensors: Aggregator | None = None
    """Tensor payloads: the example-weighted running sum, or the region's own robust rule."""
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    """Ferret: (group, seed) -> weighted sum of coefficients."""
    weight: int = 0


class MeanRelay:
    """The example-weighted mean of a region's updates, in the payload kind they came in; or,
    with a robust ``rule`` (the region's ``[method.aggregation]``), its coordinate-wise median
    or trimmed mean over the region's agents (tensor payloads; Ferret's coefficients stay a
    mean), still answered with the region's total example count (each agent's capped at
    ``max_weight``)."""

    def __init__(self, method: str, rule: AggregationParams | None = None) -> None:
        self.method = method
        self.rule = rule or AggregationParams()
        if self.rule.clip and "clip_norm" in self.rule.model_fields_set:
            raise ConfigError(
                "[method.aggregation] clip_norm: a region does not clip (the upstream clips what "
                "it receives); set it on the upstream"
            )
        self.open: RegionRound | None = None

    def begin(self) -> None:
        self.open = None

    def decode(
        self,
        round: int,
        result: TaskResult,
        blobs: Mapping[str, memoryview],
        want_meta: Mapping[str, str] | None = None,
    ) -> Update:
        """Decode and check one agent's update against the region's others (and, with
        ``want_meta``, its metadata against those entries)."""
        if set(blobs) != {UPDATE_BLOB}:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, f"expected one blob {UPDATE_BLOB!r}")
        check_examples(result.num_examples, self.rule.max_examples)
        try:
            p = payloads.decode(
                blobs[UPDATE_BLOB], payloads.Expect(method=self.method, round=round)
            )
        except ProtocolError as exc:
            raise UpdateRejected(exc.code, str(exc)) from None
        shapes = {k: tuple(v.shape) for k, v in p.tensors.items()}
        meta = payloads.caller_meta(p.meta)
        for key, value in (want_meta or {}).items():
            if meta.get(key) != value:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{key} is {meta.get(key)!r}, expected {value!r}"
                )
        if self.open is None:
            dtypes = {k: v.dtype for k, v in p.tensors.items()}
            self.open = RegionRound(p.kind, p.method, meta, shapes, dtypes)
            if p.kind is not payloads.PayloadKind.SEEDCOEF:
                self.open.tensors = Aggregator(self.rule)
        elif (
            p.kind != self.open.kind
            or meta != self.open.meta
            or (p.kind is not payloads.PayloadKind.SEEDCOEF and shapes != self.open.shapes)
        ):
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH,
                "kind, parameters or tensor shapes differ from the region's other updates",
            )
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=p.tensors,
            metrics=dict(result.metrics),
        )

    def add(self, update: Update) -> None:
        acc = self.open
        assert acc is not None, "decode() opens the round's accumulator"
        # capped as the upstream caps an agent's claim (a region's answer is not capped there:
        # one agent behind the region claiming 10 million examples would own its mean, and
        # through it the upstream's)
        w = self.rule.weight(update.num_examples)
        if acc.kind is payloads.PayloadKind.SEEDCOEF:
            t = update.tensors
            for g, s, v in zip(t["group"].tolist(), t["seed"].tolist(), t["value"].double().tolist(),
                               strict=True):  # fmt: skip
                acc.pairs[(g, s)] = acc.pairs.get((g, s), 0.0) + w * v
        else:
            assert acc.tensors is not None
            acc.tensors.add(update.tensors, w)
        acc.weight += w

    def encode(self, round: int) -> tuple[bytes, int] | None:
        """The region's mean as a payload of the agents' kind and metadata, and its total."""
        acc = self.open
        if acc is None or acc.weight == 0:
            return None
        if acc.kind is payloads.PayloadKind.SEEDCOEF:
            keys = sorted(acc.pairs)
            tensors = {
                "group": torch.tensor([k[0] for k in keys], dtype=torch.int32),
                "seed": torch.tensor([k[1] for k in keys], dtype=torch.int32),
                "value": torch.tensor([acc.pairs[k] / acc.weight for k in keys]).float(),
            }
        else:
            assert acc.tensors is not None
            combined = acc.tensors.result()
            tensors = {n: combined[n].to(acc.dtypes[n]) for n in sorted(combined)}
        data = payloads.encode(acc.kind, tensors, method=acc.method, round=round, meta=acc.meta)
        return data, acc.weight


class RelayMethod:
    """Forward the upstream task verbatim to every agent; answer with the mean of their updates."""

    def __init__(self, name: str, rule: AggregationParams | None = None) -> None:
        self.name = name
        self.task: dict[tuple[str, int], Assignment] = {}
        self.mean = MeanRelay(name, rule)
        self.answers = Answers()

    # --- toward the agents -------------------------------------------------------------------

    def set_task(self, kind: str, round: int, assignment: Assignment) -> None:
        self.task = {k: v for k, v in self.task.items() if k[1] >= round - 1}
        self.task[(kind, round)] = assignment

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        try:
            return self.task[(kind, round)]
        except KeyError:
            raise UpdateRejected(
                ErrorCode.STALE_TASK, f"no upstream {kind} task for round {round}"
            ) from None

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        return self.mean.decode(round, result, blobs)

    # --- aggregation ---------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self.mean.begin()
        self.answers.drop("train", round)

    def add(self, update: Update) -> None:
        self.mean.add(update)

    def finish_round(self, round: int) -> dict[str, float]:
        done = self.mean.encode(round)
        if done is None:
            return {"examples": 0.0}
        self.answers.put("train", round, {UPDATE_BLOB: done[0]}, done[1])
        return {"examples": float(done[1])}

    # --- state: the region's last answer, so a restart can answer a re-sent task ----------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta = self.answers.state()
        return tensors, {"relay": self.name, **meta}

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.answers.restore(tensors, meta)

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        raise NoGlobalState()


class NoGlobalState(UpdateRejected):
    def __init__(self) -> None:
        super().__init__(
            ErrorCode.UNSUPPORTED_METHOD, "a regional tier has no global state to export"
        )


def weighted_metrics(results: list[TaskResult]) -> tuple[int, dict[str, float]]:
    """The region's num_examples and example-weighted metrics of its agents' results (the
    truncation counts summed over them, as the upstream sums them over regions)."""
    total = sum(r.num_examples for r in results)
    keys = sorted({k for r in results for k in r.metrics} - set(TRUNCATION_KEYS))
    metrics = {k: v for k in keys if (v := weighted(results, k)) is not None}
    return total, metrics | truncation_totals(results)
