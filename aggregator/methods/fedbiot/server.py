"""FedBiOT server half: builds and aligns the emulator, sends it once and its changes as deltas,
averages the agents' adapters and plugs the adapter back into the full model.

Work that takes tens of seconds on a CPU (loading the base model, building the bundle, the
teacher's hidden states, the alignment before round 1 and after each round) runs on a
background thread; while it runs, ``admit`` answers with the reason, so the engine waits without
blocking its loop (heartbeats go on). ``finish_round`` only averages, merges the adapter into the
full model's last k layers and measures the full model's eval loss on cached hidden states.

What each agent holds and what it is sent: :mod:`aggregator.methods.fedbiot.serve`.
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

from aggregator.engine.admission import Waiting
from aggregator.errors import ConfigError, StateError
from aggregator.methods import AgentView, Assignment, MethodContext, Update, decode_update
from aggregator.methods.fedbiot import align
from aggregator.methods.fedbiot import bundle as bundle_io
from aggregator.methods.fedbiot.serve import EmulatorCopies
from aggregator.methods.lora_layout import rank_for
from aggregator.methods.robust import Aggregator, check_examples, clip_lora
from aggregator.store.export import write_peft_adapter
from protocol import payloads
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st

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
        self._acc = Aggregator(self.params.aggregation)
        self._payload: tuple[int, bytes] | None = None
        self._lock = threading.Lock()
        self._job: threading.Thread | None = None
        self._job_what, self._job_since = "", 0.0
        self._job_error: BaseException | None = None
        # the emulator (after preparation)
        self.aligner: align.Aligner | None = None
        self.emu_plan: emu.EmulatorPlan | None = None
        self.ratio = 0.0
        self.copies = EmulatorCopies(parsed.align.history, parsed.emulator.part_mb << 20)
        """The bundle, the alignment chain and what each agent holds of them."""
        self.moments: align.Moments | None = None
        self.pending = 0
        """Alignment steps due before the next phase (0: none)."""
        self.align_metrics: dict[str, float] = {}
        self._specs: dict[str, payloads.TensorSpec] | None = None

    # --- background work ----------------------------------------------------------------------

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None when the emulator is ready for the next phase; else why not (work under way)."""
        job = self._job
        if job is not None and job.is_alive():  # a passing wait: the engine asks again
            return Waiting(
                f"the emulator is {self._job_what} ({time.monotonic() - self._job_since:.0f} s)"
            )
        self._raise_job_error()
        if self.aligner is None or self.pending:
            what = "being built and aligned" if self.aligner is None else "being aligned"
            self._job_what, self._job_since = what, time.monotonic()
            self._job = threading.Thread(target=self._run_job, name="fedbiot-align", daemon=True)
            self._job.start()
            return Waiting(f"the emulator is {what}")
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
        from aggregator.store.modelhash import weights_sha256

        started = time.monotonic()
        model_dir, p = self.context.model_dir, self.params
        assert model_dir is not None and self.context.public_data is not None
        plan = self._plan()
        tokenizer = bundle_io.load_tokenizer(model_dir)
        samples = align.read_public(self.context.public_data, tokenizer, p.align.max_len)
        data, full_n, small_n = bundle_io.build_bundle(
            model_dir, plan, p.emulator.dtype, weights_sha256(model_dir)
        )
        bundle = emu.decode_bundle(data)
        shapes = {n: tuple(t.shape) for n, t in bundle.tensors.items()}
        targets = st.align_targets(shapes, plan.n_emulator, p.align.target_modules)
        aligner = align.Aligner(
            bundle_io.load_full(model_dir),
            bundle_io.build_small(bundle),
            plan,
            samples,
            holdout=p.align.holdout,
            targets=targets,
            r=p.align.r,
            scaling=p.align.scaling,
            pad_id=int(tokenizer.pad_token_id),
        )
        start = st.init_state(targets, p.align.r, p.align.seed)
        restored = self.copies.state
        if restored is not None:  # restored from a checkpoint
            want = st.state_specs(targets, p.align.r)
            if {n: tuple(t.shape) for n, t in restored.items()} != want:
                raise StateError("the checkpoint's alignment state does not fit this emulator")
        base_loss = aligner.full_eval()  # the full model without any adapter
        if self.global_state:
            aligner.set_adapter(self.global_state, p.lora.alpha)
        raw = aligner.held_loss(start)
        self.copies.set_bundle(data, hashlib.sha256(data).hexdigest())
        if restored is None:
            self.copies.set_chain(0, start, {0: st.state_sha(start, 0)}, {})
        with self._lock:
            self.ratio = small_n / full_n
            self.aligner = aligner
            self.align_metrics.update(align_loss_raw=raw, full_eval_base=base_loss)
            if restored is None:
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
        current = self.copies.state
        assert self.aligner is not None and current is not None
        a, v, started = self.params.align, self.copies.version, time.monotonic()
        trained, moments = self.aligner.train(
            current,
            self.moments,
            steps=steps,
            batch_size=a.batch_size,
            lr=a.lr,
            seed=(a.seed * 1_000_003 + v + 1) % 2**63,
            kl_weight=a.kl_weight,
        )
        delta = st.make_delta(trained, current)
        state = st.apply_delta(current, delta)
        sha = st.state_sha(state, v + 1)
        loss = self.aligner.held_loss(state)
        one = st.encode_deltas({v + 1: delta}, v, [self.copies.shas.get(v, ""), sha])
        self.copies.add_version(v + 1, state, sha, delta)
        with self._lock:
            self.moments = moments
            self.pending = 0
            self.align_metrics.update(align_loss=loss, align_delta_KB=len(one) / 1e3)
        log.info(
            "fedbiot: alignment v%d (%d steps) in %.1f s: held-out hidden-state loss %.4f",
            v + 1, steps, time.monotonic() - started, loss,
        )  # fmt: skip

    def _plan(self) -> emu.EmulatorPlan:
        if self.emu_plan is None:
            assert self.context.model_dir is not None
            config = bundle_io.read_config(self.context.model_dir)
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
        self.copies.on_hello(view)

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
        blobs = self.copies.blobs_for(agent_id)
        if self.global_state:
            blobs[spec.GLOBAL_BLOB] = self._global_payload(round)
        task = self.copies.task_info()
        params = self.params.model_copy(update={"task": task}).model_dump(mode="json")
        return Assignment(params=params, blobs=blobs)

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        return self.copies.take_notes()

    # --- what comes back ----------------------------------------------------------------------

    def _expect(self, round: int) -> payloads.Expect:
        """LoRA factors on exactly the target linears of the full model's adapter layers, at the
        task's ranks (derived from the task, never from the first update of a round)."""
        if self._specs is None:
            specs: dict[str, payloads.TensorSpec] = {}
            plan, targets = self._plan(), self.params.lora.target_modules
            assert self.context.model_dir is not None
            for name, shape in bundle_io.full_shapes(self.context.model_dir).items():
                layer, module = emu.layer_of(name), name.removesuffix(".weight")
                if layer not in plan.adapter or module == name or len(shape) != 2:
                    continue
                if any(module == t or module.endswith("." + t) for t in targets):
                    prefix = align.PEFT_PREFIX + module
                    r = rank_for(module, self.params.lora)  # the task's rank, not a sender's
                    specs[f"{prefix}.lora_A.weight"] = payloads.TensorSpec((r, shape[1]), F32)
                    specs[f"{prefix}.lora_B.weight"] = payloads.TensorSpec((shape[0], r), F32)
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
        agg = self.params.aggregation
        check_examples(result.num_examples, agg.max_examples)
        tensors, metrics = payload.tensors, dict(result.metrics)
        if agg.clip is not None:
            tensors, metrics["clip_scale"] = clip_lora(tensors, self.global_state or None, agg.clip)
        self.copies.saw_update(result.agent_id, payload.meta)
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=tensors,
            metrics=metrics,
        )

    # --- aggregation --------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._acc = Aggregator(self.params.aggregation)

    def add(self, update: Update) -> None:
        region = update.agent_id in self.context.regions
        weight = self.params.aggregation.weight(update.num_examples, region=region)
        self._acc.add(update.tensors, weight)

    def finish_round(self, round: int) -> dict[str, float]:
        combined = self._acc.result()
        if combined:
            self.global_state = combined
            self._payload = None
        self._built()
        assert self.aligner is not None and self.emu_plan is not None
        started = time.monotonic()
        if self.global_state:
            self.aligner.set_adapter(self.global_state, self.params.lora.alpha)
        bundles, align_bytes = self.copies.take_counts()
        metrics = {
            "examples": float(self._acc.weight),
            "emulator_ratio": _rounded(self.ratio, 4),
            "emulator_layers": float(self.emu_plan.n_emulator),
            "bundle_MB": _rounded(len(self.copies.bundle) / 1e6, 2),
            "bundle_sent": float(bundles),
            "align_KB_sent": _rounded(align_bytes / 1e3, 1),
            "align_version": float(self.copies.version),
            **{k: _rounded(v, 4) for k, v in self.align_metrics.items()},
            "full_eval_loss": _rounded(self.aligner.full_eval(), 4),
        }
        log.info("round %d: full-model eval in %.1f s", round, time.monotonic() - started)
        self.pending = self.params.align.steps
        return metrics

    # --- state --------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        c = self.copies
        tensors = dict(self.global_state)
        for name, t in (c.state or {}).items():
            tensors[_STATE + name] = t
        for v, delta in c.deltas.items():
            tensors.update({f"{_DELTA}{v}.{n}": t for n, t in delta.items()})
        if self.moments is not None:
            tensors.update({_M + n: t for n, t in self.moments.m.items()})
            tensors.update({_V + n: t for n, t in self.moments.v.items()})
        meta = {
            "params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True),
            "fedbiot.version": str(c.version),
            "fedbiot.adam_t": str(self.moments.t if self.moments is not None else 0),
            "fedbiot.shas": json.dumps({str(v): s for v, s in c.shas.items()}),
            "fedbiot.pending": str(self.pending),
            "fedbiot.emulator": c.bundle_sha,
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
                number, _, name = k[len(_DELTA) :].partition(".")
                deltas.setdefault(int(number), {})[name] = v.clone()
        version = int(meta.get("fedbiot.version", "0"))
        shas = {int(v): s for v, s in json.loads(meta.get("fedbiot.shas", "{}")).items()}
        if state:
            if version not in shas:
                raise StateError("fedbiot checkpoint: the alignment version has no sha256")
            self.copies.set_chain(version, state, shas, deltas)
        with self._lock:
            self.pending = int(meta.get("fedbiot.pending", "0"))
            self.align_metrics = json.loads(meta.get("fedbiot.align_metrics", "{}"))
            m = {k[len(_M) :]: v.clone() for k, v in tensors.items() if k.startswith(_M)}
            v_ = {k[len(_V) :]: v.clone() for k, v in tensors.items() if k.startswith(_V)}
            t = int(meta.get("fedbiot.adam_t", "0"))
            self.moments = align.Moments(t, m, v_) if m else None

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """A PEFT adapter for the *full* model: its last k layers (``layers_to_transform``)."""
        layers = sorted({i for i in map(emu.layer_of, self.global_state) if i is not None})
        return write_peft_adapter(
            out_dir,
            self.global_state,
            self.params.lora,
            base_model_name=base_model_name,
            layers=layers,
        )


def _rounded(value: float, digits: int) -> float:
    return float(round(value, digits))


Server = FedbiotServer
