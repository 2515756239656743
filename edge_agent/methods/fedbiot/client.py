"""FedBiOT client half: train LoRA on the adapter layers of emulator + adapter, never the full model.

The agent builds a small model from the emulator bundle (sent once, kept in ``ws.objects`` by its
sha256 so that a restarted agent's Hello lists it), brings its alignment state to the version the
task names (deltas or a whole state from the ``align`` blob, or a state it stores), merges that
state into the emulator's weights, and attaches LoRA to the adapter layers only. Local loss:
cross-entropy + ``prox``·‖merged adapter − merged adapter at round start‖² (the reference's term on
the merged weights, :mod:`edge_agent.methods.fedbiot.prox`). The update travels with the *full*
model's layer indices, so the server and the export never see small-model names.

Evaluation scores what users deploy: the full base model with the global adapter plugged back
into its last k layers, on the agent's held-out examples like every other method; the emulator +
adapter's loss on the same examples is reported beside it (``emulator_eval_loss``).

Training never loads the base model: it needs only the tokenizer of the task's model (checked
by hash). The bundle's metadata cannot carry the tokenizer (payload headers are capped at 256 KB,
SmolLM2's tokenizer.json is 3.5 MB), and an agent holds its base model anyway (its Hello names it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from edge_agent.errors import PayloadRejected, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import evaluation_task, train_task, training_output
from edge_agent.methods.fedbiot.prox import merged_proximal
from edge_agent.training.lora import (
    LoraSpec,
    attach_lora,
    get_adapter_state,
    init_lora_state,
    set_adapter_state,
)
from protocol import payloads
from protocol.errors import PayloadMismatch, ProtocolError
from protocol.messages import BaseModelRef
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st

log = logging.getLogger(__name__)

CACHE_KEY = "fedbiot"


@dataclass
class EmulatorModel:
    """The agent's emulator + adapter model and what it was built from."""

    key: str
    bundle_sha: str
    plan: emu.EmulatorPlan
    model: Any
    targets: dict[str, tuple[int, int]]
    base: dict[str, torch.Tensor]
    """The bundle's weights of the alignment targets (float32), to merge each version into."""
    lora: LoraSpec
    version: int | None = None
    align: dict[str, torch.Tensor] | None = None
    align_sha: str = ""


def tokenizer_for(ws: Workspace, model: BaseModelRef) -> Any:
    """The task model's tokenizer, without loading its weights where the workspace allows."""
    lend = getattr(ws, "tokenizer", None)
    if callable(lend):
        return lend(model)
    key = f"fedbiot:tokenizer:{model.sha256}"
    if key in ws.cache:
        return ws.cache[key]
    resolve = getattr(ws, "resolved_model", None)
    if callable(resolve):
        from transformers import AutoTokenizer

        from edge_agent.daemon.workspace import ModelMismatch

        local = resolve()
        if local.sha256 != model.sha256:
            raise ModelMismatch(
                f"the task's base model {model.name} has sha256 {model.sha256}, but this agent "
                f"holds {local.name} with sha256 {local.sha256}"
            )
        tokenizer = AutoTokenizer.from_pretrained(local.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    else:
        log.warning("this workspace lends no tokenizer alone; loading the base model for it")
        tokenizer = ws.base(model, "bf16")[1]
    ws.cache[key] = tokenizer
    return tokenizer


def build_small(bundle: emu.Bundle, dtype: torch.dtype) -> Any:
    """The small model of a bundle on CPU in ``dtype``, every base weight frozen."""
    try:
        return emu.build_small(bundle, dtype)
    except PayloadMismatch as exc:
        raise PayloadRejected(str(exc)) from None


def _adapter_spec(model: Any, plan: emu.EmulatorPlan, params: spec.Params) -> LoraSpec:
    """LoRA on the target linears of the adapter layers (small-model names)."""
    lora = params.lora
    names = []
    for name, module in model.named_modules():
        layer = emu.layer_of(name + ".")
        if layer is None or layer < plan.n_emulator or not isinstance(module, torch.nn.Linear):
            continue
        if any(name.endswith("." + t) for t in lora.target_modules):
            names.append(name)
    if not names:
        raise TaskError(f"no adapter-layer linear of the emulator matches {lora.target_modules}")
    small = plan.full_to_adapter()
    pattern = {
        (emu.renamed(k, small) if emu.layer_of(k) in small else k): v
        for k, v in lora.rank_pattern.items()
    }
    return LoraSpec(lora.r, lora.alpha, lora.dropout, tuple(names), pattern)


def emulator_for(task: TaskInput, ws: Workspace, params: spec.Params) -> EmulatorModel:
    """The cached emulator model of the task's bundle, built from the blob or the object store."""
    info = params.task
    if info is None:
        raise PayloadRejected("the task names no emulator (params.task is missing)")
    dtype = torch.bfloat16 if task.assign.quant == "bf16" else torch.float32
    key = f"{info.emulator_sha256}:{dtype}:{params.lora.model_dump_json()}"
    cached = ws.cache.get(CACHE_KEY)
    if isinstance(cached, EmulatorModel) and cached.key == key:
        return cached
    ws.cache.pop(CACHE_KEY, None)
    try:
        data: Any = spec.bundle_of(task.blobs)
    except ProtocolError as exc:
        raise PayloadRejected(str(exc)) from None
    if data is not None:
        sha = ws.objects.put(data)
        if sha != info.emulator_sha256:
            ws.objects.discard(sha)
            raise PayloadRejected(f"the emulator blob has sha256 {sha}, the task names another")
    else:
        data = ws.objects.get(info.emulator_sha256)
        if data is None:
            raise TaskError(
                f"this agent does not hold emulator {info.emulator_sha256[:12]}…; restart it so "
                "that its Hello asks for the emulator again"
            )
    try:
        bundle = emu.decode_bundle(data)
    except ProtocolError as exc:
        raise PayloadRejected(f"emulator bundle rejected: {exc}") from None
    if bundle.base_sha256 != task.assign.model.sha256:
        raise PayloadRejected("the emulator was not cut from the task's base model")
    model = build_small(bundle, dtype)
    shapes = {n: tuple(t.shape) for n, t in bundle.tensors.items()}
    targets = st.align_targets(shapes, bundle.plan.n_emulator, params.align.target_modules)
    base = {f"{m}.weight": bundle.tensors[f"{m}.weight"].to(torch.float32) for m in targets}
    lora = _adapter_spec(model, bundle.plan, params)
    peft_model = attach_lora(model, lora, init_seed=params.lora.init_seed)
    if isinstance(cached, EmulatorModel) and cached.bundle_sha != info.emulator_sha256:
        ws.objects.discard(cached.bundle_sha)  # a new run's emulator replaces the old one
    built = EmulatorModel(key, info.emulator_sha256, bundle.plan, peft_model, targets, base, lora)
    ws.cache[CACHE_KEY] = built
    log.info(
        "emulator %s…: %d emulator + %d adapter layers (of %d)",
        info.emulator_sha256[:12], bundle.plan.n_emulator, bundle.plan.adapter_layers,
        bundle.plan.full_layers,
    )  # fmt: skip
    return built


def sync_alignment(em: EmulatorModel, task: TaskInput, ws: Workspace, params: spec.Params) -> None:
    """Bring the emulator to the task's alignment version and merge it into the weights."""
    info = params.task
    assert info is not None
    if em.align_sha == info.align_sha256:
        return
    a = params.align
    current = (em.version, em.align) if em.version is not None and em.align else None
    try:
        version, state, blob = st.reach(
            info.align_version,
            info.align_sha256,
            task.blobs.get(spec.ALIGN_BLOB),
            em.targets,
            (a.r, a.seed),
            current,
            ws.objects.get,
        )
    except st.NotHeld as exc:
        raise TaskError(
            f"{exc}; restart the agent so that its Hello tells the aggregator what it holds"
        ) from None
    except ProtocolError as exc:
        raise PayloadRejected(f"alignment rejected: {exc}") from None
    chain = blob.shas if blob is not None else []
    data = st.state_bytes(state, version)
    sha = ws.objects.put(data)
    if version != info.align_version or sha != info.align_sha256:
        ws.objects.discard(sha)
        raise PayloadRejected(f"alignment state of version {version} does not match the task's")
    for old in {em.align_sha, *chain} - {sha, ""}:
        ws.objects.discard(old)
    body = em.model.get_base_model()
    with torch.no_grad():
        for name, weight in st.merged_weights(em.base, state, a.scaling).items():
            target = body.get_parameter(name)
            target.copy_(weight.to(target.dtype))
    em.version, em.align, em.align_sha = version, state, sha


def load_global(em: EmulatorModel, task: TaskInput, params: spec.Params) -> None:
    """The global adapter (full-model names) into the adapter layers, or the seeded start."""
    lora = params.lora
    raw = task.blobs.get(spec.GLOBAL_BLOB)
    if raw is None:
        set_adapter_state(em.model, init_lora_state(em.model, em.lora, lora.init_seed))
        return
    expect = payloads.Expect(
        kind=payloads.PayloadKind.LORA, round=task.assign.round, max_rank=lora.r
    )
    try:
        tensors = payloads.decode(raw, expect).tensors
        set_adapter_state(em.model, emu.rename_layers(tensors, em.plan.full_to_adapter()))
    except ProtocolError as exc:
        raise PayloadRejected(f"global adapter rejected: {exc}") from None


def full_model(task: TaskInput, ws: Workspace, params: spec.Params, plan: emu.EmulatorPlan) -> Any:
    """The task's full base model with LoRA on its adapter layers (the last k), holding the global
    adapter (full-model names already) or, before round 1, the seeded start (B = 0: the base).
    The base is taken from the workspace, not lent: it is loaded for each evaluation and dropped
    after it, so an agent holds the full model only while it evaluates."""
    lora = params.lora
    shape = LoraSpec(
        lora.r,
        lora.alpha,
        lora.dropout,
        tuple(lora.target_modules),
        dict(lora.rank_pattern),
        layers=plan.adapter,
    )
    a = task.assign
    base, _ = ws.take_base(a.model, a.quant)  # not kept: training never needs it
    model = attach_lora(base, shape, init_seed=lora.init_seed)
    raw = task.blobs.get(spec.GLOBAL_BLOB)
    if raw is None:
        set_adapter_state(model, init_lora_state(model, shape, lora.init_seed))
        return model
    rank = max([lora.r, *lora.rank_pattern.values()])
    expect = payloads.Expect(kind=payloads.PayloadKind.LORA, round=a.round, max_rank=rank)
    try:
        set_adapter_state(model, payloads.decode(raw, expect).tensors)
    except ProtocolError as exc:
        raise PayloadRejected(f"global adapter rejected: {exc}") from None
    return model


def evaluate_both(
    task: TaskInput, ws: Workspace, params: spec.Params, em: EmulatorModel, tokenizer: Any
) -> TaskOutput:
    """What users deploy, scored like every other method: the full model with the adapter
    plugged back, on the agent's held-out examples (``eval_loss``, Rouge-L, exact match). The
    emulator + adapter's loss on the same examples is a side metric, ``emulator_eval_loss``."""
    from edge_agent.training.train import evaluate

    e = params.eval
    examples = ws.eval_examples[: e.max_examples]
    if not examples:
        raise TaskError("no held-out examples to evaluate on")
    on_emulator = evaluate(
        em.model, tokenizer, examples, max_len=e.max_len, batch_size=e.batch_size,
        exact_match=False, progress=ws.progress,
    )  # fmt: skip
    out = evaluation_task(full_model(task, ws, params, em.plan), tokenizer, e, ws)
    out.metrics["emulator_eval_loss"] = on_emulator.loss
    out.metrics["seconds"] = out.metrics.get("seconds", 0.0) + on_emulator.seconds
    return out


class FedbiotClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        tokenizer = tokenizer_for(ws, task.assign.model)
        em = emulator_for(task, ws, params)
        sync_alignment(em, task, ws, params)
        load_global(em, task, params)
        if task.assign.kind == "eval":
            return evaluate_both(task, ws, params, em, tokenizer)
        result = train_task(
            em.model,
            tokenizer,
            ws,
            params.train,
            task.assign.round,
            extra_loss=merged_proximal(em.model, params.prox),
        )
        state = emu.rename_layers(get_adapter_state(em.model), em.plan.adapter_to_full())
        blob = payloads.encode(
            payloads.PayloadKind.LORA,
            state,
            method=self.name,
            round=task.assign.round,
            meta={"fedbiot.emulator": em.bundle_sha, "fedbiot.align": em.align_sha},
        )
        log.info(
            "round %d: trained the adapter %d steps on emulator v%s, loss %.4f → %.4f",
            task.assign.round, result.steps, em.version, result.first_loss, result.last_loss,
        )  # fmt: skip
        return training_output(result, {spec.UPDATE_BLOB: blob})


Client = FedbiotClient
