"""FedBiOT server half: builds and aligns the emulator, sends it once and its changes as deltas,
averages the agents' adapters and plugs the adapter back into the full model.

Work that takes tens of seconds on a CPU (loading the base model, building the bundle, the
teacher's hidden states, the alignment before round 1 and after each round) runs on a
background thread; while it runs, ``admit`` answers with the reason, so the engine waits without
blocking its loop (heartbeats go on). ``finish_round`` only averages, merges the adapter into the
full model's last k layers and measures the full model's eval loss on cached hidden states.

What each agent holds is known from its Hello (``holds``: the bundle and its alignment state by
sha256), from its accepted updates (their metadata name the emulator), and from what it was sent
(an agent that lost something says so in its next Hello, which resets what is known of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.checkpoint import atomic_write_bytes
from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.export import ADAPTER_CONFIG, write_peft_adapter
from aggregator.methods import AgentView, Assignment, MethodContext, Update, decode_update
from aggregator.methods import _fedbiot_align as align
from aggregator.methods.fedit import FedAvg
from aggregator.robust import check_examples
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import _fedbiot_emulator as emu
from protocol.methods import fedbiot as spec
from protocol.methods import parse_params
from protocol.methods._common import AggregationParams

log = logging.getLogger(__name__)

_STATE, _DELTA, _M, _V = "fedbiot.state.", "fedbiot.delta.", "fedbiot.adam_m.", "fedbiot.adam_v."
F32 = torch.float32


class FedbiotServer:
    name = spec.NAME

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        self.params: spec.Params = parsed
        self.context = context or MethodContext()
        if self.context.model_dir is None or self.context.public_data is None:
            raise ConfigError(
                "fedbiot needs the base model as a directory (run.model_dir) and public data "
                "to align the emulator on (run.public_data)"
            )
        self.global_state: dict[str, torch.Tensor] = {}
        self._acc = FedAvg()
        self._payload: tuple[int, bytes] | None = None
        self._lock = threading.Lock()
        self._job: threading.Thread | None = None
        self._job_what, self._job_since = "", 0.0
        self._job_error: BaseException | None = None
        # the emulator (after preparation)
        self.aligner: align.Aligner | None = None
        self.emu_plan: emu.EmulatorPlan | None = None
        self.bundle: bytes = b""
        self.bundle_sha = ""
        self.ratio = 0.0
        # the alignment chain: version, state, the sha256 of recent versions, recent deltas
        self.version = 0
        self.align_state: dict[str, torch.Tensor] | None = None
        self.shas: dict[int, str] = {}
        self.deltas: dict[int, dict[str, torch.Tensor]] = {}
        self.moments: align.Moments | None = None
        self.pending = 0
        """Alignment steps due before the next phase (0: none)."""
        self.align_metrics: dict[str, float] = {}
        self._blobs: dict[tuple[int, int], bytes] = {}
        self._specs: dict[str, payloads.TensorSpec] | None = None
        # what agents hold, and what was sent since the last round closed
        self._holds: dict[str, frozenset[str]] = {}
        self._has_bundle: set[str] = set()
        self._version_of: dict[str, int] = {}
        self._sent: dict[str, dict[str, str]] = {}
        self._sent_bundles = 0
        self._sent_align = 0

    # --- background work ----------------------------------------------------------------------

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None when the emulator is ready for the next phase; else why not (work under way)."""
        job = self._job
        if job is not None and job.is_alive():
            return f"the emulator is {self._job_what} ({time.monotonic() - self._job_since:.0f} s)"
        self._raise_job_error()
        if self.aligner is None or self.pending:
            what = "being built and aligned" if self.aligner is None else "being aligned"
            self._job_what, self._job_since = what, time.monotonic()
            self._job = threading.Thread(target=self._run_job, name="fedbiot-align", daemon=True)
            self._job.start()
            return f"the emulator is {what}"
        return None

    def _run_job(self) -> None:
        try:
            self.prepare()
        except BaseException as exc:  # handed to the engine thread by admit/prepare
            log.exception("fedbiot: emulator preparation failed")
            self._job_error = exc

    def _raise_job_error(self) -> None:
        exc, self._job_error = self._job_error, None
        if exc is None:
            return
        if isinstance(exc, ConfigError | StateError):
            raise exc
        raise StateError(f"fedbiot: preparing the emulator failed: {exc}") from exc

    def prepare(self) -> None:
        """Make the emulator current: build it (first call), then run any due alignment."""
        self._built()
        if self.pending:
            self._align(self.pending)

    def _built(self) -> None:
        """Wait for background work under way (re-raising its error); build if never built."""
        job = self._job
        if job is not None and job.is_alive() and threading.current_thread() is not job:
            job.join()
        if threading.current_thread() is not job:
            self._raise_job_error()
        if self.aligner is None:
            self._build()

    def _build(self) -> None:
        from aggregator.modelhash import weights_sha256

        started = time.monotonic()
        model_dir, p = self.context.model_dir, self.params
        assert model_dir is not None and self.context.public_data is not None
        plan = self._plan()
        tokenizer = align.load_tokenizer(model_dir)
        samples = align.read_public(self.context.public_data, tokenizer, p.align.max_len)
        data, full_n, small_n = align.build_bundle(
            model_dir, plan, p.emulator.dtype, weights_sha256(model_dir)
        )
        bundle = emu.decode_bundle(data)
        shapes = {n: tuple(t.shape) for n, t in bundle.tensors.items()}
        targets = emu.align_targets(shapes, plan.n_emulator, p.align.target_modules)
        aligner = align.Aligner(
            align.load_full(model_dir),
            align.build_small(bundle),
            plan,
            samples,
            holdout=p.align.holdout,
            targets=targets,
            r=p.align.r,
            scaling=p.align.scaling,
            pad_id=int(tokenizer.pad_token_id),
        )
        start = emu.init_state(targets, p.align.r, p.align.seed)
        if self.align_state is not None:  # restored from a checkpoint
            want = emu.state_specs(targets, p.align.r)
            if {n: tuple(t.shape) for n, t in self.align_state.items()} != want:
                raise StateError("the checkpoint's alignment state does not fit this emulator")
        base_loss = aligner.full_eval()  # the full model without any adapter
        if self.global_state:
            aligner.set_adapter(self.global_state, p.lora.alpha)
        raw = aligner.held_loss(start)
        with self._lock:
            self.bundle, self.bundle_sha = data, hashlib.sha256(data).hexdigest()
            self.ratio = small_n / full_n
            self.aligner = aligner
            self.align_metrics.update(align_loss_raw=raw, full_eval_base=base_loss)
            if self.align_state is None:
                self.align_state, self.version, self.shas = start, 0, {0: emu.state_sha(start, 0)}
                self.align_metrics["align_loss"] = raw
                self.pending = p.align.initial_steps
        log.info(
            "fedbiot: emulator of %d+%d of %d layers (%s, %.1f MB, %.0f%% of the parameters) "
            "built in %.1f s; held-out hidden-state loss %.4f before alignment",
            plan.n_emulator, plan.adapter_layers, plan.full_layers, plan.emulator,
            len(data) / 1e6, 100 * self.ratio, time.monotonic() - started, raw,
        )  # fmt: skip

    def _align(self, steps: int) -> None:
        """One alignment session: version v → v+1 (the delta rounded to bf16, as it travels)."""
        assert self.aligner is not None and self.align_state is not None
        a, v, started = self.params.align, self.version, time.monotonic()
        trained, moments = self.aligner.train(
            self.align_state,
            self.moments,
            steps=steps,
            batch_size=a.batch_size,
            lr=a.lr,
            seed=(a.seed * 1_000_003 + v + 1) % 2**63,
            kl_weight=a.kl_weight,
        )
        delta = emu.make_delta(trained, self.align_state)
        state = emu.apply_delta(self.align_state, delta)
        sha = emu.state_sha(state, v + 1)
        loss = self.aligner.held_loss(state)
        one = emu.encode_deltas({v + 1: delta}, v, [self.shas.get(v, ""), sha])
        with self._lock:
            self.align_state, self.version, self.moments = state, v + 1, moments
            self.deltas[v + 1], self.shas[v + 1] = delta, sha
            for old in [d for d in self.deltas if d <= v + 1 - a.history]:
                del self.deltas[old]
            for old in [s for s in self.shas if s < v + 1 - a.history]:
                del self.shas[old]
            self._blobs.clear()
            self.pending = 0
            self.align_metrics.update(align_loss=loss, align_delta_KB=len(one) / 1e3)
        log.info(
            "fedbiot: alignment v%d (%d steps) in %.1f s: held-out hidden-state loss %.4f",
            v + 1, steps, time.monotonic() - started, loss,
        )  # fmt: skip

    def _plan(self) -> emu.EmulatorPlan:
        if self.emu_plan is None:
            assert self.context.model_dir is not None
            config = align.read_config(self.context.model_dir)
            e = self.params.emulator
            try:
                self.emu_plan = emu.plan_emulator(
                    int(config["num_hidden_layers"]), e.adapter_layers, e.drop_ratio
                )
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"fedbiot: cannot cut an emulator: {exc}") from None
        return self.emu_plan

    # --- what agents are sent -----------------------------------------------------------------

    def on_hello(self, view: AgentView) -> None:
        with self._lock:
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

    def _align_blob(self, have: int | None) -> bytes | None:
        """What brings an agent at version ``have`` (None: nothing) to the current version."""
        t = self.version
        if t == 0:
            return None  # version 0 is seeded: every agent makes it itself
        base = 0 if have is None or have > t else have
        key = (base, t)
        if key not in self._blobs:
            assert self.align_state is not None
            whole = emu.state_bytes(self.align_state, t)
            chain = range(base + 1, t + 1)
            if all(v in self.deltas for v in chain) and all(v in self.shas for v in (base, *chain)):
                parts = {v: self.deltas[v] for v in chain}
                deltas = emu.encode_deltas(parts, base, [self.shas[v] for v in (base, *chain)])
                whole = min(whole, deltas, key=len)
            self._blobs[key] = whole
        return self._blobs[key]

    def _global_payload(self, round: int) -> bytes:
        if self._payload is None or self._payload[0] != round:
            data = payloads.encode_lora(self.global_state, method=self.name, round=round)
            self._payload = (round, data)
        return self._payload[1]

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        # an eval task uses the emulator the round was trained on; a train task the current one
        # (the engine admits a train phase only once the alignment due is done: no wait here)
        if kind == "train":
            self.prepare()
        else:
            self._built()
        with self._lock:
            self._known(agent_id)
            blobs: dict[str, bytes] = {}
            notes = self._sent.setdefault(agent_id, {})
            if self.global_state:
                blobs[spec.GLOBAL_BLOB] = self._global_payload(round)
            if agent_id not in self._has_bundle:
                blobs[spec.EMULATOR_BLOB] = self.bundle
                self._has_bundle.add(agent_id)
                self._sent_bundles += 1
                notes["emulator"] = f"sent ({len(self.bundle) / 1e6:.1f} MB)"
            have = self._version_of.get(agent_id)
            if have != self.version:
                blob = self._align_blob(have)
                if blob is not None:
                    blobs[spec.ALIGN_BLOB] = blob
                    self._sent_align += len(blob)
                    notes["align"] = f"v{have if have is not None else '-'}→v{self.version}"
                self._version_of[agent_id] = self.version
            task = spec.TaskInfo(
                emulator_sha256=self.bundle_sha,
                align_version=self.version,
                align_sha256=self.shas[self.version],
            )
        params = self.params.model_copy(update={"task": task}).model_dump(mode="json")
        return Assignment(params=params, blobs=blobs)

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        with self._lock:
            sent, self._sent = self._sent, {}
        return sent

    # --- what comes back ----------------------------------------------------------------------

    def _expect(self, round: int) -> payloads.Expect:
        """LoRA factors on exactly the target linears of the full model's adapter layers."""
        if self._specs is None:
            specs: dict[str, payloads.TensorSpec] = {}
            plan, targets = self._plan(), self.params.lora.target_modules
            assert self.context.model_dir is not None
            for name, shape in align.full_shapes(self.context.model_dir).items():
                layer, module = emu.layer_of(name), name.removesuffix(".weight")
                if layer not in plan.adapter or module == name or len(shape) != 2:
                    continue
                if any(module == t or module.endswith("." + t) for t in targets):
                    prefix = align.PEFT_PREFIX + module
                    specs[f"{prefix}.lora_A.weight"] = payloads.TensorSpec((None, shape[1]), F32)
                    specs[f"{prefix}.lora_B.weight"] = payloads.TensorSpec((shape[0], None), F32)
            if not specs:
                raise ConfigError(f"fedbiot: no adapter-layer linear matches {list(targets)}")
            self._specs = specs
        lora = self.params.lora
        return payloads.Expect(
            kind=payloads.PayloadKind.LORA,
            method=self.name,
            round=round,
            tensors=self._specs,
            max_rank=max([lora.r, *lora.rank_pattern.values()]),
        )

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        payload = decode_update(blobs, spec.UPDATE_BLOB, self._expect(round))
        check_examples(result.num_examples, AggregationParams())
        shapes = {k: tuple(v.shape) for k, v in payload.tensors.items()}
        fixed = self.global_state or self._acc.sums
        if fixed and shapes != {k: tuple(v.shape) for k, v in fixed.items()}:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, "adapter ranks differ from the round's"
            )
        with self._lock:
            if payload.meta.get("fedbiot.emulator") == self.bundle_sha:
                self._has_bundle.add(result.agent_id)
            trained_on = [v for v, s in self.shas.items() if s == payload.meta.get("fedbiot.align")]
            if trained_on:
                self._version_of[result.agent_id] = trained_on[0]
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=payload.tensors,
            metrics=dict(result.metrics),
        )

    # --- aggregation --------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._acc = FedAvg()

    def add(self, update: Update) -> None:
        self._acc.add(update.tensors, update.num_examples)

    def finish_round(self, round: int) -> dict[str, float]:
        combined = self._acc.mean()
        if combined:
            self.global_state = combined
            self._payload = None
        self._built()
        assert self.aligner is not None and self.emu_plan is not None
        started = time.monotonic()
        if self.global_state:
            self.aligner.set_adapter(self.global_state, self.params.lora.alpha)
        metrics = {
            "examples": float(self._acc.weight),
            "emulator_ratio": _rounded(self.ratio, 4),
            "emulator_layers": float(self.emu_plan.n_emulator),
            "bundle_MB": _rounded(len(self.bundle) / 1e6, 2),
            "bundle_sent": float(self._sent_bundles),
            "align_KB_sent": _rounded(self._sent_align / 1e3, 1),
            "align_version": float(self.version),
            **{k: _rounded(v, 4) for k, v in self.align_metrics.items()},
            "full_eval_loss": _rounded(self.aligner.full_eval(), 4),
        }
        log.info("round %d: full-model eval in %.1f s", round, time.monotonic() - started)
        self._sent_bundles = self._sent_align = 0
        self.pending = self.params.align.steps
        return metrics

    # --- state --------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = dict(self.global_state)
        for name, t in (self.align_state or {}).items():
            tensors[_STATE + name] = t
        for v, delta in self.deltas.items():
            tensors.update({f"{_DELTA}{v}.{n}": t for n, t in delta.items()})
        if self.moments is not None:
            tensors.update({_M + n: t for n, t in self.moments.m.items()})
            tensors.update({_V + n: t for n, t in self.moments.v.items()})
        meta = {
            "params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True),
            "fedbiot.version": str(self.version),
            "fedbiot.adam_t": str(self.moments.t if self.moments is not None else 0),
            "fedbiot.shas": json.dumps({str(v): s for v, s in self.shas.items()}),
            "fedbiot.pending": str(self.pending),
            "fedbiot.emulator": self.bundle_sha,
            "fedbiot.align_metrics": json.dumps(self.align_metrics, sort_keys=True),
        }
        return tensors, meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        self.global_state = {k: v.clone() for k, v in tensors.items() if ".lora_" in k}
        self._payload = None
        state = {k[len(_STATE) :]: v.clone() for k, v in tensors.items() if k.startswith(_STATE)}
        deltas: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith(_DELTA):
                version, _, name = k[len(_DELTA) :].partition(".")
                deltas.setdefault(int(version), {})[name] = v.clone()
        with self._lock:
            self.align_state = state or None
            self.deltas = deltas
            self.version = int(meta.get("fedbiot.version", "0"))
            self.shas = {int(v): s for v, s in json.loads(meta.get("fedbiot.shas", "{}")).items()}
            self.pending = int(meta.get("fedbiot.pending", "0"))
            self.align_metrics = json.loads(meta.get("fedbiot.align_metrics", "{}"))
            m = {k[len(_M) :]: v.clone() for k, v in tensors.items() if k.startswith(_M)}
            v_ = {k[len(_V) :]: v.clone() for k, v in tensors.items() if k.startswith(_V)}
            t = int(meta.get("fedbiot.adam_t", "0"))
            self.moments = align.Moments(t, m, v_) if m else None
            self._blobs.clear()
        if self.align_state is not None and self.version not in self.shas:
            raise StateError("fedbiot checkpoint: the alignment version has no sha256")

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """A PEFT adapter for the *full* model: its last k layers (``layers_to_transform``)."""
        written = write_peft_adapter(
            out_dir, self.global_state, self.params.lora, base_model_name=base_model_name
        )
        layers = sorted({i for i in map(emu.layer_of, self.global_state) if i is not None})
        config = json.loads(written["config"].read_text())
        config.update(layers_to_transform=layers, layers_pattern="layers")
        atomic_write_bytes(out_dir / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
        return written


def _rounded(value: float, digits: int) -> float:
    return float(round(value, digits))


Server = FedbiotServer
