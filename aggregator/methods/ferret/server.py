"""Ferret server half: average coefficients per (group, seed), rebuild and apply the step.

The server holds the global weights (the base from ``run.model_dir`` plus every round's step)
and the coefficient history. What it checkpoints is the history alone: the weights are the
base plus the history replayed, bit for bit (``protocol.methods.ferret.math.apply_step``), so
``restore`` rebuilds them. Each agent is sent the aggregated triples of the rounds it has not
applied yet, or, more than ``max_catchup`` rounds behind, the dense weights once.

Rebuilding a step costs seconds to tens of seconds on a small CPU (up to K x parameters random
signs), longer than an agent's liveness window, and the engine calls :meth:`finish_round` on
its socket loop. So :meth:`finish_round` only averages the coefficients (milliseconds) and
queues the rebuild on one background thread, which applies the rounds in order while the
agents evaluate and train. What reads the weights (dense catch-up, export) waits for it;
agents never need the server's weights, only the coefficients.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.methods import Assignment, MethodContext, Update, decode_update
from aggregator.methods._full_model import write_full_model
from aggregator.methods.robust import Aggregator, check_examples
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.ferret import grid, spec
from protocol.methods.ferret import math as fm
from protocol.secagg import wire

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HISTORY = ("round", "group", "seed", "value")
Triples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def load_base_weights(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's parameters by name (safetensors only; a tied LM head once)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"ferret: no *.safetensors weights in run.model_dir {model_dir}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text("utf-8")) if config_path.exists() else {}
    if config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    return {n: t.to(dtype).contiguous() for n, t in weights.items()}


class FerretServer:
    name = spec.NAME

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        context = context or MethodContext()
        if context.model_dir is None:
            raise ConfigError(
                "ferret needs the base model's weights on the aggregator: set run.model_dir"
            )
        self.model_dir = Path(context.model_dir)
        self._regions = context.regions
        self.p = parsed.ferret
        if "seed" not in self.p.model_fields_set:  # the run's seed, unless the params set one
            self.p = self.p.model_copy(update={"seed": context.seed})
        if self.p.anneal == "linear" and self.p.rounds is None:
            if not context.rounds:
                raise ConfigError(
                    "ferret.anneal = linear needs the run's round count: ferret.rounds"
                )
            self.p = self.p.model_copy(update={"rounds": context.rounds})
        self.dtype = _DTYPES[self.p.dtype]
        self.weights = load_base_weights(self.model_dir, self.dtype)
        self.layout = fm.build_layout({n: tuple(t.shape) for n, t in self.weights.items()})
        if self.p.layout is not None and self.p.layout != self.layout.sha256():
            raise ConfigError("ferret.layout does not match the model in run.model_dir")
        self.params: spec.Params = parsed.model_copy(
            update={"ferret": self.p.model_copy(update={"layout": self.layout.sha256()})}
        )
        self.p = self.params.ferret
        self.agg = self.params.aggregation
        if "clip_norm" in self.agg.model_fields_set and self.agg.clip:
            raise ConfigError(
                "[method.aggregation] clip_norm does not apply to ferret; each coefficient is "
                "clipped to [method.ferret] clip_norm"
            )
        self._robust: Aggregator | None = None
        self._params_json = self.params.model_dump(mode="json")
        self.round = 0
        """The last round whose step is known (its coefficients are in ``history``)."""
        self.applied = 0
        """The last round whose step is in ``weights`` (the background rebuild may lag)."""
        self.history: dict[int, Triples] = {}
        self.recon_seconds: dict[int, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferret-rebuild")
        self._pending: list[Future[None]] = []
        self._held: dict[str, int] = {}
        self._sent: dict[str, tuple[tuple[str, int], dict[str, bytes]]] = {}
        self._step_payloads: dict[int, bytes] = {}
        self._dense: tuple[int, bytes] | None = None
        self.begin_round(1)
        log.info(
            "ferret: %d parameters in %d groups, K = %d, %s",
            self.layout.numel,
            len(self.layout.groups),
            self.p.k,
            self.p.dtype,
        )

    @property
    def n_groups(self) -> int:
        return len(self.layout.groups)

    # --- what agents are sent ---------------------------------------------------------------

    # an agent holds the weights, their gradients, the base copy and its own model: measured
    # 3.25 GB peak for SmolLM2-135M in fp32 (0.54 GB of weights), so about 6x the weights.
    MEMORY_FACTOR = 6.0

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None if the agent can hold full-parameter training, else why not."""
        weight_bytes = sum(t.numel() * t.element_size() for t in self.weights.values())
        need = self.MEMORY_FACTOR * weight_bytes
        have = max([g.memory_free for g in profile.gpus], default=profile.ram_available)
        if have >= need:
            return None
        where = "GPU" if profile.gpus else "RAM"
        return (
            f"full-parameter training needs about {need / 2**30:.1f} GiB ({self.MEMORY_FACTOR:g}x "
            f"the {weight_bytes / 2**30:.2f} GiB of weights); it has {have / 2**30:.1f} GiB free {where}"
        )

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        target = round if kind == "eval" else round - 1
        if target != self.round:
            raise StateError(
                f"ferret: asked for round {target}'s model, holding round {self.round}"
            )
        sent = self._sent.get(agent_id)
        if sent is not None and sent[0] == (kind, round):
            blobs = sent[1]  # the same task again (the agent reconnected): the same blobs
        else:
            blobs = self._catch_up(agent_id, target)
            self._sent[agent_id] = ((kind, round), blobs)
            self._held[agent_id] = target
        return Assignment(params=self._params_json, blobs=blobs)

    def _catch_up(self, agent_id: str, target: int) -> dict[str, bytes]:
        start = self._held.get(agent_id, 0)  # unknown agents may hold the base
        if start == target:
            return {}
        if 0 <= start < target and target - start <= self.p.max_catchup:
            return {spec.step_blob(r): self._step_payload(r) for r in range(start + 1, target + 1)}
        return {spec.GLOBAL_BLOB: self._dense_payload(target)}

    def _step_payload(self, round: int) -> bytes:
        data = self._step_payloads.get(round)
        if data is None:
            data = self._encode_triples(round, *self.history[round])
            for old in [r for r in self._step_payloads if r <= round - self.p.max_catchup]:
                del self._step_payloads[old]
            self._step_payloads[round] = data
        return data

    def _dense_payload(self, round: int) -> bytes:
        self.wait_weights()
        if self._dense is None or self._dense[0] != round:
            log.info("ferret: encoding the dense global model of round %d", round)
            self._dense = (
                round,
                payloads.encode_dense(self.weights, method=self.name, round=round),
            )
        return self._dense[1]

    # --- what comes back --------------------------------------------------------------------

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        expect = payloads.Expect(
            kind=payloads.PayloadKind.SEEDCOEF,
            method=self.name,
            round=round,
            base_seed=fm.pool_base_seed(self.p.seed),
            k=self.p.k,
            n_groups=self.n_groups,
        )
        payload = decode_update(blobs, spec.UPDATE_BLOB, expect)
        n_triples = payload.tensors["value"].numel()
        self._check_held(round, result, n_triples)
        if n_triples == 0 and result.num_examples > 0:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "the update holds no coefficients")
        check_examples(max(result.num_examples, 1), self.agg.max_examples)
        tensors, metrics = dict(payload.tensors), dict(result.metrics)
        bound = self.p.clip_norm  # one agent's coefficient moves a term at most this far
        values = tensors["value"]
        clipped = int(np.count_nonzero(np.abs(values.numpy()) > bound))  # numpy: ~1,000 values
        if clipped:
            tensors["value"] = values.clamp(-bound, bound)
            metrics["clipped_coefficients"] = float(clipped)
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=tensors,
            metrics=metrics,
        )

    def _check_held(self, round: int, result: TaskResult, n_triples: int | None) -> None:
        """The round the agent trained from (``held_round``); an out-of-sync result marks the
        agent for a resync and must carry no update (``n_triples`` None: masked, unknown)."""
        held = result.metrics.get(spec.HELD_ROUND)
        if result.metrics.get(spec.OUT_OF_SYNC):
            if result.num_examples != 0 or n_triples or held is None:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, "an out-of-sync result carries no update"
                )
            # behind: send from there; ahead (an older global state was restored): dense
            self._held[result.agent_id] = int(held) if 0 <= held < round else -1
            log.warning(
                "ferret: %s holds round %d, not %d; it will be resynced",
                result.agent_id,
                int(held),
                round - 1,
            )
        elif held is not None and held != round - 1:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH,
                f"update trained from global round {held:g}, not {round - 1}",
            )

    # --- under secure aggregation (aggregator/privacy/secagg_method.py) ----------------------

    def secure_layout(self, round: int) -> wire.Layout:
        """What every agent masks in ``round``: the dense (group, seed) coefficient grid."""
        base_seed = fm.pool_base_seed(self.p.seed)
        return grid.grid_layout(base_seed, self.p.k, self.n_groups)

    def check_masked(self, round: int, result: TaskResult) -> None:
        """What :meth:`validate` checks of a result that is left once its update is masked."""
        self._check_held(round, result, None)
        check_examples(max(result.num_examples, 1), self.agg.max_examples)

    def secure_payload(self, round: int, mean: Any) -> bytes:
        """The unmasked mean grid as one ``seedcoef`` update for :meth:`validate`: its non-zero
        coefficients in (group, seed) order, as :meth:`finish_round` makes its own triples.
        Each agent clamped its coefficients to ``clip_norm`` before masking, so the mean is
        within it and the clamp of :meth:`validate` changes nothing."""
        return self._encode_triples(round, *grid.triples_from_grid(mean, self.p.k))

    def _encode_triples(self, round: int, group: Any, seed: Any, value: Any) -> bytes:
        """Round ``round``'s (group, seed, coefficient) triples as a ``seedcoef`` payload."""
        return payloads.encode_seedcoef(
            group,
            seed,
            value,
            base_seed=fm.pool_base_seed(self.p.seed),
            k=self.p.k,
            n_groups=self.n_groups,
            method=self.name,
            round=round,
        )

    # --- aggregation ------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._sums = torch.zeros(self.n_groups * self.p.k, dtype=torch.float64)
        self._weight = 0
        self._robust = Aggregator(self.agg) if self.agg.rule != "fedavg" else None

    def add(self, update: Update) -> None:
        t = update.tensors
        if update.num_examples <= 0 or t["value"].numel() == 0:
            return
        weight = self.agg.weight(update.num_examples, region=update.agent_id in self._regions)
        # numpy, not torch: for ~1,000 triples torch's per-call overhead was most of the time
        index = t["group"].numpy().astype(np.int64) * self.p.k + t["seed"].numpy()
        values = t["value"].numpy().astype(np.float64)
        if self._robust is not None:  # every coefficient, dense (0 where none was sent)
            dense = np.zeros(self.n_groups * self.p.k, dtype=np.float64)
            np.add.at(dense, index, values)
            self._robust.add({"coef": torch.from_numpy(dense)}, weight)
        else:
            np.add.at(self._sums.numpy(), index, values * weight)
        self._weight += weight

    def finish_round(self, round: int) -> dict[str, float]:
        if round != self.round + 1:
            raise StateError(f"ferret: finishing round {round} after round {self.round}")
        if self._robust is not None:
            combined = self._robust.result().get("coef")
            zeros = torch.zeros(self.n_groups * self.p.k, dtype=torch.float32)
            mean = zeros if combined is None else combined.to(torch.float32)
        else:
            mean = (self._sums / max(self._weight, 1)).to(torch.float32)
        flat = torch.nonzero(mean).squeeze(1)  # ascending: sorted by (group, seed)
        triples = (
            (flat // self.p.k).to(torch.int32),
            (flat % self.p.k).to(torch.int32),
            mean[flat].clone(),
        )
        self._commit(round, triples)
        clipped = sum(fm.is_clipped(v, self.p.clip_norm) for v in triples[2].tolist())
        metrics = {
            "k": float(self.p.k),
            "server_lr": spec.server_lr_at(self.p, round),
            "triples": float(triples[2].numel()),
            "clipped": float(clipped),
            "step_bytes": float(len(self._step_payload(round))),
            "examples": float(self._weight),
        }
        if round - 1 in self.recon_seconds:
            metrics["prev_recon_s"] = self.recon_seconds[round - 1]
        return metrics

    def _commit(self, round: int, triples: Triples) -> None:
        """Record ``round``'s step and queue its rebuild into the weights."""
        self.history[round] = triples
        self.round = round
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._pool.submit(self._rebuild, round, triples))

    def _rebuild(self, round: int, triples: Triples) -> None:
        started = time.perf_counter()
        stats = fm.apply_step(
            self.weights,
            self.layout,
            fm.pool_base_seed(self.p.seed),
            *triples,
            server_lr=spec.server_lr_at(self.p, round),
            clip_norm=self.p.clip_norm,
            measure=True,
        )
        seconds = time.perf_counter() - started
        self.recon_seconds[round] = seconds
        self.applied = round
        log.info(
            "round %d: step of %d triples rebuilt and applied in %.2f s (step norm %.4g)",
            round,
            stats.terms,
            seconds,
            math.sqrt(stats.sq_norm),
        )

    def close(self) -> None:
        """The run is over: finish the queued rebuilds and stop the rebuild thread (an idle
        executor thread per run otherwise outlives it, holding the run's weights)."""
        try:
            self.wait_weights()
        finally:
            self._pool.shutdown(wait=True)

    def wait_weights(self) -> None:
        """Block until every committed step is in ``weights``; re-raise a failed rebuild."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except Exception as exc:
                raise StateError(f"ferret: rebuilding the global weights failed: {exc}") from exc

    # --- state ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        rounds = sorted(self.history)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in _HISTORY}
        for r in rounds:
            group, seed, value = self.history[r]
            cols["round"].append(torch.full((group.numel(),), r, dtype=torch.int32))
            cols["group"].append(group)
            cols["seed"].append(seed)
            cols["value"].append(value)
        dtypes = {"round": torch.int32, "group": torch.int32, "seed": torch.int32}
        tensors = {
            f"history.{k}": torch.cat(v)
            if v
            else torch.zeros(0, dtype=dtypes.get(k, torch.float32))
            for k, v in cols.items()
        }
        meta = {
            "params": json.dumps(self._params_json, sort_keys=True),
            "layout": self.layout.sha256(),
            "round": str(self.round),
        }
        return tensors, meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        """Take the checkpoint's history; the weights are rebuilt from the base in background."""
        if meta.get("layout", self.layout.sha256()) != self.layout.sha256():
            raise StateError("the checkpoint was made with another model (Ferret layout differs)")
        want = int(meta.get("round", "0"))
        self.wait_weights()
        if self.applied:
            self.weights = load_base_weights(self.model_dir, self.dtype)
        self.round = self.applied = 0
        self.history, self.recon_seconds = {}, {}
        self._held, self._sent, self._step_payloads, self._dense = {}, {}, {}, None
        rounds = tensors["history.round"].to(torch.int64)
        for r in range(1, want + 1):
            mask = rounds == r
            triples = (
                tensors["history.group"][mask].to(torch.int32),
                tensors["history.seed"][mask].to(torch.int32),
                tensors["history.value"][mask].to(torch.float32),
            )
            self._commit(r, triples)
        log.info("ferret: restored %d rounds of coefficients; rebuilding the weights", want)

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """The full fine-tuned model as an HF directory (Ferret has no adapter)."""
        self.wait_weights()
        info = {"method": self.name, "base_model": base_model_name, "round": self.round}
        return write_full_model(self.model_dir, self.weights, out_dir, info)


Server = FerretServer
