"""SLoRA server half: FedAvg of seeded-mask values (stage 1), SVD switch, then FedAvg of LoRA.

Stage 1 global state: per target weight, the float32 vector ``W[mask] - W_base[mask]`` (the
accumulated sparse update; empty before the first commit, meaning zero). When round
``sparse.stage1_rounds + 1`` begins, :func:`switch.lora_from_sparse` turns each LoRA
target's ``ΔW`` into LoRA factors and the global state becomes that adapter (peft names); from then on it is FedIT's
FedAvg. Switching at the start of the next round rather than at the commit lets the eval of
round ``stage1_rounds`` measure the sparse model itself; the switch is a pure function of the
committed stage-1 state, so a restart after that commit recomputes the same adapter. The SVDs
take seconds on a real model (every target's ``ΔW``), so the switch runs on a background thread
from ``begin_round``; while it runs, ``admit`` answers with the reason and the engine waits
without blocking its loop (heartbeats go on); anything that reads the stage waits for it.
The stage, the mask seed and the target shapes are checkpoint metadata, so a restarted
aggregator resumes in the stage it was in.

The sparse target shapes (``sparse.target_modules``: by default every linear layer) come from the
base model's safetensors headers when the run names a local ``model_dir``; otherwise from round
1's stage-1 updates (their payloads' full shapes, names restricted to the sparse targets): the shapes most agents sent win (``lora_layout.LayoutVote``),
never the first sender's, and are fixed from then on.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.engine.admission import Waiting
from aggregator.errors import StateError, UpdateRejected
from aggregator.methods import Assignment, MethodContext, Update, decode_update
from aggregator.methods._targets import Shapes, is_target, target_shapes
from aggregator.methods.lora_layout import LayoutVote, Signature
from aggregator.methods.robust import Aggregator, check_examples, clip_lora, clip_values
from aggregator.methods.slora import switch
from aggregator.store.export import write_peft_adapter
from protocol import payloads, randomness
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.slora import sizes, spec

log = logging.getLogger(__name__)

ADMIT_WAIT_S = 0.5
"""How long starting the switch waits for it, once (a small model's switch takes milliseconds:
its next round opens at once); after that ``admit`` answers "not yet" without waiting."""


# --- the server -----------------------------------------------------------------------------------


class SloraServer:
    name = spec.NAME

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        context = context or MethodContext()
        self._regions = context.regions
        seed = parsed.sparse.mask_seed
        self.mask_seed: int = context.seed if seed is None else seed
        sparse = parsed.sparse.model_copy(update={"mask_seed": self.mask_seed})
        self.params: spec.Params = parsed.model_copy(update={"sparse": sparse})
        self.targets = tuple(self.params.sparse.target_modules)
        self.shapes: Shapes | None = None
        if context.model_dir is not None:
            self.shapes = target_shapes(context.model_dir, self.targets)
            self._check_density()
        self._stage = 1
        self._job: threading.Thread | None = None
        self._job_since = 0.0
        self._job_out: tuple[dict[str, torch.Tensor], float] | BaseException | None = None
        self.values: dict[str, torch.Tensor] = {}  # stage 1: accumulated masked update
        self.lora: dict[str, torch.Tensor] = {}  # stage 2: global adapter
        self.svd_energy: float | None = None
        self._counts: dict[str, int] | None = None
        self._payload: tuple[int, int, bytes] | None = None
        self._acc = Aggregator(self.params.aggregation)
        self._vote = LayoutVote(lambda: Aggregator(self.params.aggregation))
        self._vote_shapes: dict[str, Signature] = {}  # task id -> shapes it sent (no model)
        self._switched = False
        self._switch_evals = switch.SwitchEvals(self.params.eval.max_examples)

    def _check_density(self) -> None:
        """Warn when a stage-1 upload would outweigh the stage-2 adapter (see ``sizes``)."""
        assert self.shapes is not None
        lora = sizes.select(self.shapes, tuple(self.params.lora.target_modules))
        even = sizes.break_even_density(self.shapes, lora, self.params.lora.r)
        if self.density > even:
            log.warning(
                "sparse.density %.4g is above this model's break-even %.4g: a stage-1 upload "
                "is %.1fx the LoRA r=%d adapter",
                self.density,
                even,
                self.density / even,
                self.params.lora.r,
            )

    @property
    def stage(self) -> int:
        """1 or 2; a switch under way is waited for first."""
        self._settle()
        return self._stage

    @property
    def density(self) -> float:
        return self.params.sparse.density

    def mask_counts(self) -> dict[str, int]:
        """Masked entries per target (needs the shapes)."""
        if self._counts is None:
            if self.shapes is None:
                raise StateError("the target shapes are not known yet")
            self._counts = {
                n: randomness.mask_count(
                    randomness.stream_key(self.mask_seed, n), math.prod(s), self.density
                )
                for n, s in self.shapes.items()
            }
        return self._counts

    # --- what agents are sent -----------------------------------------------------------------

    def _global_payload(self, round: int) -> bytes | None:
        if self._payload is None or self._payload[:2] != (round, self.stage):
            if self.stage == 1:
                if not self.values or self.shapes is None:
                    return None
                data = payloads.encode_masked(
                    self.values,
                    self.shapes,
                    seed=self.mask_seed,
                    density=self.density,
                    method=self.name,
                    round=round,
                )
            else:
                data = payloads.encode_lora(self.lora, method=self.name, round=round)
            self._payload = (round, self.stage, data)
        return self._payload[2]

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        stage = self.stage
        switch_eval = stage == 2 and self._switched and kind == "train"
        params = self.params.model_copy(update={"stage": stage, "switch_eval": switch_eval})
        blob = self._global_payload(round)
        blobs = {spec.GLOBAL_BLOB: blob} if blob is not None else {}
        return Assignment(params=params.model_dump(mode="json"), blobs=blobs)

    # --- what comes back ----------------------------------------------------------------------

    def _expect(self, round: int) -> payloads.Expect:
        if self.stage == 2:
            return payloads.Expect(
                kind=payloads.PayloadKind.LORA,
                method=self.name,
                round=round,
                tensors={
                    k: payloads.TensorSpec(shape=tuple(v.shape), dtype=torch.float32)
                    for k, v in self.lora.items()
                },
                max_rank=self.params.lora.r,
            )
        tensors = None
        if self.shapes is not None:
            tensors = {
                n: payloads.TensorSpec(shape=(c,), dtype=torch.float32)
                for n, c in self.mask_counts().items()
            }
        return payloads.Expect(
            kind=payloads.PayloadKind.MASKED,
            method=self.name,
            round=round,
            tensors=tensors,
            shapes=self.shapes,
            seed=self.mask_seed,
            density=self.density,
        )

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        payload = decode_update(blobs, spec.UPDATE_BLOB, self._expect(round))
        if not payload.tensors:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "the update holds no tensors")
        check_examples(result.num_examples, self.params.aggregation.max_examples)
        stage = self.stage
        if stage == 1 and self.shapes is None:
            self._vote_shapes[result.task_id] = self._check_shapes(payload)
        tensors, metrics = payload.tensors, dict(result.metrics)
        clip = self.params.aggregation.clip
        if clip is not None:
            if stage == 1:
                tensors, metrics["clip_scale"] = clip_values(tensors, self.values or None, clip)
            else:
                tensors, metrics["clip_scale"] = clip_lora(tensors, self.lora or None, clip)
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=tensors,
            metrics=metrics,
        )

    def _check_shapes(self, payload: payloads.Payload) -> Signature:
        """Without a model directory: the update's target shapes, to be voted on (sparse targets
        only; the round's most common shapes become the run's)."""
        shapes = payload.shapes
        bad = [n[:200] for n, s in shapes.items() if not is_target(n, self.targets) or len(s) != 2]
        if bad:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"not sparse target weights: {bad[:3]}"
            )
        sig = tuple(sorted((n, (int(s[0]), int(s[1]))) for n, s in shapes.items()))
        if not self._vote.admits(sig):
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "too many distinct layouts sent")
        return sig

    # --- aggregation --------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._acc = Aggregator(self.params.aggregation)
        self._vote = LayoutVote(lambda: Aggregator(self.params.aggregation))
        self._vote_shapes.clear()
        self._switched = False
        self._switch_evals = switch.SwitchEvals(self.params.eval.max_examples)
        if self.stage == 1 and round > self.params.sparse.stage1_rounds:
            self._start_switch(round)

    def _start_switch(self, round: int) -> None:
        if self.shapes is None:
            log.warning("round %d: no stage-1 update yet, the switch to LoRA waits", round)
            return
        if self._job is not None:
            return
        self._job_since, self._job_out = time.monotonic(), None
        self._job = threading.Thread(
            target=self._switch_job, args=(round,), name="slora-switch", daemon=True
        )
        self._job.start()
        self._job.join(ADMIT_WAIT_S)  # a small model's switch is done by now: no round is lost

    def _switch_job(self, round: int) -> None:
        try:
            self._job_out = self.lora_from_sparse()
        except BaseException as exc:  # re-raised by _settle on the engine's thread
            self._job_out = exc
        log.info(
            "round %d: SVD switch computed in %.1f s", round, time.monotonic() - self._job_since
        )

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None unless the switch to LoRA is still being computed (then why the engine waits)."""
        job = self._job
        if job is not None and job.is_alive():  # never waits: the engine asks for every agent
            waited = time.monotonic() - self._job_since
            return Waiting(
                f"switching to LoRA: the SVDs of the sparse update ({waited:.0f} s so far)"
            )
        return None

    def _settle(self) -> None:
        """Apply a switch under way (waiting for it)."""
        job = self._job
        if job is None:
            return
        job.join()
        out, self._job, self._job_out = self._job_out, None, None
        if isinstance(out, BaseException):
            raise StateError(f"slora: the switch to LoRA failed: {out}") from out
        assert out is not None
        self.lora, self.svd_energy = out
        self._stage, self.values, self._switched, self._payload = 2, {}, True, None
        log.info(
            "switched to LoRA r=%d, init %s (it keeps %.1f%% of the sparse update's energy)",
            self.params.lora.r,
            self.params.sparse.init,
            100 * self.svd_energy,
        )

    def add(self, update: Update) -> None:
        sig = self._vote_shapes.pop(update.task_id, None)
        region = update.agent_id in self._regions
        weight = self.params.aggregation.weight(update.num_examples, region=region)
        if sig is not None and self.shapes is None:
            self._vote.add(sig, update.tensors, weight)
        else:
            self._acc.add(update.tensors, weight)
        if self._switched:
            self._switch_evals.add(update.metrics)

    def finish_round(self, round: int) -> dict[str, float]:
        won = self._vote.winner() if self.shapes is None else None
        tied = self._vote.count if self.shapes is None and won is None else 0
        self._vote = LayoutVote(lambda: Aggregator(self.params.aggregation))
        if won is not None:
            sig, self._acc, left_out = won
            self.shapes = {n: (int(s[0]), int(s[1])) for n, s in sig}
            self._counts = None
            log.info("target shapes voted by round %d's agents: %d weights", round, len(sig))
        mean = self._acc.result()
        metrics = {"examples": float(self._acc.weight), "stage": float(self.stage)}
        if won is not None:
            metrics["layout_left_out"] = float(won[2])
        elif tied:  # a tie: nothing applied
            metrics["layout_left_out"] = float(tied)
        self._payload = None
        if self.stage == 1:
            if mean:
                self.values = mean
            metrics["density"] = self.density
        else:
            if mean:
                self.lora = mean
            if self._switched and self.svd_energy is not None:
                metrics["svd_energy"] = self.svd_energy
            if self._switched:
                metrics.update(self._switch_evals.result())
        return metrics

    def delta_w(self, name: str) -> torch.Tensor:
        """The dense stage-1 update ``ΔW`` of target ``name`` (float64; zero before round 1)."""
        if self.shapes is None:
            raise StateError("the target shapes are not known yet")
        shape = self.shapes[name]
        return switch.delta_w(name, shape, self.values.get(name), self.mask_seed, self.density)

    def lora_from_sparse(self) -> tuple[dict[str, torch.Tensor], float]:
        """The stage-2 adapter of the current stage-1 update (``switch.lora_from_sparse``)."""
        assert self.shapes is not None
        return switch.lora_from_sparse(
            self.shapes, self.values, seed=self.mask_seed, density=self.density, params=self.params
        )

    # --- state --------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True),
            "stage": str(self.stage),
            "mask_seed": str(self.mask_seed),
            "shapes": json.dumps(self.shapes) if self.shapes is not None else "",
        }
        if self.svd_energy is not None:
            meta["svd_energy"] = repr(self.svd_energy)
        tensors = self.values if self.stage == 1 else self.lora
        return dict(tensors), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        try:
            stage = int(meta.get("stage", "1"))
            seed = int(meta.get("mask_seed", str(self.mask_seed)))
            raw = meta.get("shapes", "")
            shapes = (
                {k: (int(v[0]), int(v[1])) for k, v in json.loads(raw).items()} if raw else None
            )
        except (ValueError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise StateError(f"slora checkpoint metadata is damaged: {exc}") from None
        if stage not in (1, 2):
            raise StateError(f"slora checkpoint names stage {stage}")
        if seed != self.mask_seed:
            log.warning("mask seed %d from the checkpoint replaces %d", seed, self.mask_seed)
            self.mask_seed = seed
            sparse = self.params.sparse.model_copy(update={"mask_seed": seed})
            self.params = self.params.model_copy(update={"sparse": sparse})
        if shapes is not None:
            self.shapes = shapes
        self._counts = None
        self._job = None
        self._stage = stage
        copied = {k: v.clone() for k, v in tensors.items()}
        self.values, self.lora = (copied, {}) if stage == 1 else ({}, copied)
        self.svd_energy = float(meta["svd_energy"]) if "svd_energy" in meta else None
        self._payload = None

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """The global adapter as a PEFT directory (in stage 1: the SVD init of the update)."""
        if self.stage == 1:
            if self.shapes is None or not self.values:
                raise StateError("there is no global update to export yet")
            log.warning("exporting during stage 1: the adapter is the rank-r SVD of the update")
            state = self.lora_from_sparse()[0]
        else:
            state = self.lora
        return write_peft_adapter(out_dir, state, self.params.lora, base_model_name=base_model_name)


Server = SloraServer
