"""FedPipe client half: importance scores, LoRA on the assigned matrices at the assigned ranks.

Score tasks: per candidate matrix ``W`` (a decoder linear named by ``lora.target_modules``),
``Σ_batches Σ_ij |W_ij · ∂L/∂W_ij|`` with ``L`` the batch's mean response cross-entropy. The
base may be quantized, and its weights then have no gradient, so the gradient is rebuilt per
layer from what a frozen layer still sees: a forward hook keeps the layer's input ``X`` and a
hook on its output receives ``∂L/∂Y``; then ``∂L/∂W = (∂L/∂Y)ᵀ·X`` (summed over tokens) and
``W`` is the layer's weight, dequantized for NF4/int8. Only activations carry gradients.

Train tasks: a peft adapter on exactly the modules of ``params.ranks`` at those ranks (scaled
by ``lora.module_scaling(rank)`` per module: ``alpha / rank``, or peft's ``use_rslora`` with
``lora.rslora``), initialised from blob ``global`` or, in round 1, from the seeded init of
``edge_agent.training.lora``; then ``train.steps`` steps of batch ``train.batch_size`` on the
task's precision, measuring AdaLoRA's sensitivity of the adapter entries after every step
(:mod:`edge_agent.methods.fedpipe.sensitivity`), reported per module beside the update with the
task's peak memory. Eval tasks attach the global ΔW at its own ranks (exact) and evaluate.
One adapter is attached at a time: a different shape unloads the old one (``unload()`` puts
the base modules back unmerged) before the new one is attached.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from edge_agent.errors import ModelError, PayloadRejected, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import (
    attached_adapter,
    evaluation_task,
    release_adapter,
    train_task,
    training_output,
)
from edge_agent.methods.fedpipe.sensitivity import Sensitivity
from edge_agent.training.data import IGNORE_INDEX, Example, collate, tokenize
from edge_agent.training.lora import LoraSpec, get_adapter_state, init_lora_state, set_adapter_state
from protocol import payloads
from protocol.errors import ProtocolError
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec

log = logging.getLogger(__name__)


# --- importance ---------------------------------------------------------------------------------


def decoder_linears(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers whose last name is one of ``targets``, by module name."""
    out: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and "layers" in parts and parts[-1] in targets:
            out[name] = module
    return out


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as float32 ``[out, in]``, dequantized for bitsandbytes NF4/int8."""
    w: Any = module.weight
    if getattr(w, "quant_state", None) is not None:  # bnb Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if w.dtype == torch.int8:  # bnb Int8Params: int8 rows and a per-row absmax scale
        # the first forward moves the scales from the weight to the layer's state
        scale = getattr(w, "SCB", None)
        if scale is None:
            scale = getattr(getattr(module, "state", None), "SCB", None)
        if scale is None:
            raise TaskError("an int8 layer has no row scales (SCB) to dequantize with")
        return w.data.float() * (scale.float()[:, None] / 127.0)
    return w.detach().float()


@dataclass
class Scores:
    values: dict[str, float]
    examples: int
    tokens_mean: float


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    stream: list[int] = []
    while True:
        while len(stream) < batch_size:
            stream += torch.randperm(n, generator=generator).tolist()
        yield stream[:batch_size]
        stream = stream[batch_size:]


def importance(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    p: spec.ScoreParams,
    targets: Sequence[str],
) -> Scores:
    """Importance of every decoder linear of ``model`` over ``p.batches`` batches."""
    if not examples:
        raise TaskError("no training examples to score with")
    modules = decoder_linears(model, targets)
    if not modules:
        raise TaskError(f"the model has no decoder linear among {list(targets)}")
    data = tokenize(examples, tokenizer, p.max_len)
    device = next(model.parameters()).device
    sums = dict.fromkeys(modules, 0.0)

    def grad_hook(name: str, x: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:  # once per layer and batch, during backward
            dw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            w = dense_weight(modules[name]).to(dw.device)  # dequantized for this layer only
            sums[name] += float((w * dw).abs().sum(dtype=torch.float64))

        return hook

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(grad_hook(name, inputs[0].detach()))

        return hook

    def embeddings_hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)  # every weight is frozen: gradients run on activations only

    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    for q in model.parameters():
        q.requires_grad_(False)
    get_embeddings: Any = getattr(model, "get_input_embeddings")  # noqa: B009
    handles = [get_embeddings().register_forward_hook(embeddings_hook)]
    handles += [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()  # no dropout: the score of a batch is a function of the batch
    tokens = 0
    order = _batches(len(data), p.batch_size, p.seed)
    try:
        for _ in range(p.batches):
            ids, attention, labels = collate(
                [data[i] for i in next(order)], tokenizer.pad_token_id, device, left=False
            )
            tokens += ids.numel()
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            if not torch.isfinite(loss):
                raise TaskError(f"scoring loss is {float(loss)}")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, q in model.named_parameters():
            q.requires_grad_(flags[n])
        model.train(was_training)
    if p.normalize == "mean":
        sums = {n: v / modules[n].in_features / modules[n].out_features for n, v in sums.items()}
    count = p.batches * p.batch_size
    return Scores(values=sums, examples=count, tokens_mean=tokens / count)


def peak_memory(device: torch.device) -> float:
    """Bytes at the peak: the GPU's allocated peak since the task reset it, else the process's
    maximum resident set (Linux reports it in KiB)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


# --- the adapter --------------------------------------------------------------------------------


def lora_spec(ranks: Mapping[str, int], lora: spec.FedpipeLora) -> LoraSpec:
    """peft's shape for ``ranks`` (full module names, so a name matches that module only)."""
    return LoraSpec(
        r=max(ranks.values()),
        alpha=lora.peft_alpha,
        dropout=lora.dropout,
        target_modules=tuple(sorted(ranks)),
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        rslora=lora.peft_rslora,
    )


def adapter_for(
    task: TaskInput, ws: Workspace, ranks: Mapping[str, int], lora: spec.FedpipeLora
) -> tuple[Any, Any]:
    """A peft model with an adapter on exactly ``ranks``' modules at those ranks (reused while
    the shape stays the same)."""
    a = task.assign
    key = ("fedpipe", a.model.sha256, a.quant, tuple(sorted(ranks.items())), lora.peft_alpha,
           lora.peft_rslora, lora.dropout)  # fmt: skip
    peft_model, tokenizer = attached_adapter(ws, a, lora_spec(ranks, lora), lora.init_seed, key)
    got = fm.ranks_of(get_adapter_state(peft_model))
    if got != dict(ranks):
        release_adapter(ws)
        missing = sorted(set(ranks) - set(got))
        raise TaskError(f"the adapter does not have the assigned ranks (missing {missing[:3]})")
    return peft_model, tokenizer


def _decode_global(blob: memoryview, round: int, expect: Mapping[str, Any] | None) -> Any:
    specs = None
    if expect is not None:
        specs = {k: payloads.TensorSpec(tuple(v.shape), torch.float32) for k, v in expect.items()}
    try:
        return payloads.decode(
            blob, payloads.Expect(kind=payloads.PayloadKind.LORA, round=round, tensors=specs)
        )
    except ProtocolError as exc:
        raise PayloadRejected(f"global adapter rejected: {exc}") from None


# --- the client ---------------------------------------------------------------------------------


class FedpipeClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        kind = task.assign.kind
        if kind == "score":
            return self._score(task, ws, params)
        if kind == "eval":
            return self._evaluate(task, ws, params)
        return self._train(task, ws, params)

    def _score(self, task: TaskInput, ws: Workspace, params: spec.Params) -> TaskOutput:
        release_adapter(ws)
        base, tokenizer = ws.base(task.assign.model, task.assign.quant)
        started = time.perf_counter()
        scores = importance(
            base, tokenizer, ws.train_examples, params.score, params.lora.target_modules
        )
        tensors = {m: torch.tensor([v], dtype=torch.float32) for m, v in scores.values.items()}
        blob = payloads.encode_dense(tensors, method=self.name, round=task.assign.round)
        seconds = time.perf_counter() - started
        log.info(
            "scored %d matrices on %d examples in %.1fs", len(tensors), scores.examples, seconds
        )
        return TaskOutput(
            num_examples=scores.examples,
            metrics={spec.TOKENS_MEAN: scores.tokens_mean, "seconds": seconds},
            blobs={spec.SCORE_BLOB: blob},
        )

    def _train(self, task: TaskInput, ws: Workspace, params: spec.Params) -> TaskOutput:
        if not params.ranks:
            raise TaskError("a fedpipe train task must assign ranks")
        peft_model, tokenizer = adapter_for(task, ws, params.ranks, params.lora)
        blob = task.blobs.get(spec.GLOBAL_BLOB)
        if blob is not None:
            current = get_adapter_state(peft_model)
            payload = _decode_global(blob, task.assign.round, current)
            set_adapter_state(peft_model, payload.tensors)
        else:  # round 1: the seeded adapter (set again: a retried task may reuse the model)
            shape = lora_spec(params.ranks, params.lora)
            set_adapter_state(peft_model, init_lora_state(peft_model, shape, params.lora.init_seed))
        sensitivity = Sensitivity(peft_model, params.select.beta1, params.select.beta2)
        device = next(peft_model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = train_task(
            peft_model,
            tokenizer,
            ws,
            params.train,
            task.assign.round,
            after_step=sensitivity.update,
        )
        state = get_adapter_state(peft_model)
        update = payloads.encode_lora(state, method=self.name, round=task.assign.round)
        values = sensitivity.scores()
        scores = {m: torch.tensor([values.get(m, 0.0)], dtype=torch.float32) for m in params.ranks}
        sens_blob = payloads.encode_dense(scores, method=self.name, round=task.assign.round)
        log.info(
            "round %d: %d modules, ranks %s, %s base, %d steps of %d: loss %.4f -> %.4f "
            "(mean %.4f; one batch each, noisy at a small batch)",
            task.assign.round,
            len(params.ranks),
            sorted(set(params.ranks.values()), reverse=True),
            task.assign.quant,
            result.steps,
            params.train.batch_size,
            result.first_loss,
            result.last_loss,
            result.mean_loss,
        )
        output = training_output(
            result, {spec.UPDATE_BLOB: update, spec.SENSITIVITY_BLOB: sens_blob}
        )
        output.metrics[spec.MEMORY_PEAK] = peak_memory(device)
        return output

    def _evaluate(self, task: TaskInput, ws: Workspace, params: spec.Params) -> TaskOutput:
        blob = task.blobs.get(spec.GLOBAL_BLOB)
        if blob is None:  # before round 1: the base model itself
            release_adapter(ws)
            model, tokenizer = ws.base(task.assign.model, task.assign.quant)
            return evaluation_task(model, tokenizer, params.eval, ws)
        payload = _decode_global(blob, task.assign.round, None)
        ranks = fm.ranks_of(payload.tensors)
        if not ranks or len(payload.tensors) != 2 * len(ranks):
            raise PayloadRejected("the global adapter is not pairs of lora_A and lora_B")
        peft_model, tokenizer = adapter_for(task, ws, ranks, params.lora)
        try:
            set_adapter_state(peft_model, payload.tensors)
        except ModelError as exc:
            raise PayloadRejected(f"global adapter does not fit the model: {exc}") from None
        return evaluation_task(peft_model, tokenizer, params.eval, ws)


Client = FedpipeClient
