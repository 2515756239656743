"""SLoRA client half: stage 1 trains seeded-mask entries of the dense weights, stage 2 is FedIT.

Stage 1. The base is loaded unquantized (:func:`protocol.methods.slora.spec.stage1_quant`). Each
target weight ``W`` (a ``nn.Linear`` named by ``sparse.target_modules``, peft's matching rule:
by default every linear layer of the blocks, attention and MLP)
gets a parametrization (``torch.nn.utils.parametrize``)::

    W_eff = W  with  W_eff.flat[mask] = (W.flat[mask] + delta).to(W.dtype)

where ``mask`` is the spec's seeded mask of the weight's ``named_parameters()`` name and
``delta`` is a trainable float32 vector of the mask's size, starting at the global sparse
update. Every base parameter is frozen, so AdamW holds exactly the masked entries (two float32
moments each) and no gradient reaches any other entry. After the task the parametrizations
are removed, leaving the cached base model bit-identical to the original; ``delta`` travels
as a ``masked`` payload.

Stage 2 reuses FedIT's peft model and adapter loading on the task's (possibly quantized) base.
The first stage-2 round's train task (``switch_eval``) evaluates the adapter it received before
training: ``switch_eval_loss``/``_em``; with the agent's own evaluations of the base (round 0)
and of the last stage-1 global, kept from those eval tasks, also ``switch_eval_base_*`` and
``switch_eval_sparse_*`` (the server turns them into the share of stage 1's gain kept).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils import parametrize

from edge_agent.errors import PayloadRejected, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.methods._common import evaluation_task, train_task, training_output
from edge_agent.methods.fedit.client import load_global, peft_model_for
from protocol import payloads, randomness
from protocol.errors import ProtocolError
from protocol.methods.slora import spec

log = logging.getLogger(__name__)


# --- stage-1 building blocks ------------------------------------------------------------------


def sparse_targets(model: torch.nn.Module, target_modules: tuple[str, ...]) -> dict[str, Any]:
    """``{weight name as in named_parameters(): its Linear}`` for the target modules.

    A module already wrapped by a peft LoRA layer (a base shared with a FedIT run) is reached
    through its ``base_layer`` under its unwrapped name.
    """
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not name or not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        linear = getattr(module, "base_layer", module)
        if not isinstance(linear, torch.nn.Linear):
            raise TaskError(f"target {name} is a {type(linear).__name__}, not a Linear")
        out[name.removeprefix("base_model.model.") + ".weight"] = linear
    if not out:
        raise TaskError(f"no module of the model matches the targets {list(target_modules)}")
    return out


def sparse_masks(targets: Mapping[str, Any], seed: int, density: float) -> dict[str, torch.Tensor]:
    """The seeded mask (flat int64 indices, ascending) of every target weight."""
    return {
        name: torch.from_numpy(
            randomness.mask_indices(
                randomness.stream_key(seed, name), linear.weight.numel(), density
            )
        )
        for name, linear in targets.items()
    }


class MaskedDelta(torch.nn.Module):
    """Parametrization ``W -> W`` with the masked entries replaced by ``W[mask] + delta``."""

    idx: torch.Tensor
    base_values: torch.Tensor

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, init: torch.Tensor) -> None:
        super().__init__()
        idx = mask.to(weight.device)
        self.register_buffer("idx", idx, persistent=False)
        base = weight.detach().reshape(-1)[idx].to(torch.float32)
        self.register_buffer("base_values", base, persistent=False)
        self.delta = torch.nn.Parameter(init.to(device=weight.device, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        new = (self.base_values + self.delta).to(weight.dtype)
        return weight.reshape(-1).index_put((self.idx,), new).view_as(weight)


@contextlib.contextmanager
def sparse_deltas(
    model: torch.nn.Module,
    targets: Mapping[str, Any],
    masks: Mapping[str, torch.Tensor],
    init: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Freeze ``model`` and make only the masked entries of the targets trainable.

    Yields ``{weight name: delta}``; on exit the parametrizations are removed (the weights
    are the original tensors again) and any LoRA layers disabled here are enabled again.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers: list[Any] = [
        m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")
    ]
    disabled = [m for m in wrappers if not m.disable_adapters]
    for m in disabled:
        m.enable_adapters(False)
    done: list[Any] = []
    deltas: dict[str, torch.nn.Parameter] = {}
    try:
        for name, linear in targets.items():
            mask = masks[name]
            start = init.get(name) if init is not None else None
            values = torch.zeros(mask.numel()) if start is None else start
            if values.shape != (mask.numel(),):
                raise PayloadRejected(f"{name}: {values.numel()} values for {mask.numel()}")
            param = MaskedDelta(linear.weight, mask, values)
            parametrize.register_parametrization(linear, "weight", param)
            done.append(linear)
            deltas[name] = param.delta
        yield deltas
    finally:
        for linear in done:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        for m in disabled:
            m.enable_adapters(True)


def decode_global_values(
    blobs: Mapping[str, memoryview],
    round: int,
    shapes: Mapping[str, tuple[int, ...]],
    masks: Mapping[str, torch.Tensor],
    seed: int,
    density: float,
) -> dict[str, torch.Tensor] | None:
    """The global sparse update of a stage-1 task, checked against this agent's masks."""
    if spec.GLOBAL_BLOB not in blobs:
        return None
    expect = payloads.Expect(
        kind=payloads.PayloadKind.MASKED,
        method=spec.NAME,
        round=round,
        shapes=shapes,
        seed=seed,
        density=density,
        tensors={
            n: payloads.TensorSpec(shape=(m.numel(),), dtype=torch.float32)
            for n, m in masks.items()
        },
    )
    try:
        return payloads.decode(blobs[spec.GLOBAL_BLOB], expect).tensors
    except ProtocolError as exc:
        raise PayloadRejected(f"global sparse update rejected: {exc}") from None


# --- the client -------------------------------------------------------------------------------


class SloraClient:
    name = spec.NAME

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        params = task.params
        assert isinstance(params, spec.Params)
        if params.stage == 1:
            return self._stage1(task, ws, params)
        return self._stage2(task, ws, params)

    def _stage1(self, task: TaskInput, ws: Workspace, params: spec.Params) -> TaskOutput:
        seed = params.sparse.mask_seed
        if seed is None:
            raise TaskError("a stage-1 task must carry sparse.mask_seed")
        density = params.sparse.density
        quant = spec.stage1_quant(task.assign.quant)
        if quant != task.assign.quant:
            log.info(
                "round %d: stage 1 trains on the %s base, not %s: masked entries of a quantized "
                "weight cannot be trained (the paper's sparse stage is full precision)",
                task.assign.round,
                quant,
                task.assign.quant,
            )
        model, tokenizer = ws.base(task.assign.model, quant)
        targets = sparse_targets(model, tuple(params.sparse.target_modules))
        key = f"slora-masks:{task.assign.model.sha256}:{seed}:{density!r}:{sorted(targets)}"
        masks = ws.cache.get(key)
        if masks is None:
            for old in [k for k in ws.cache if k.startswith("slora-masks:")]:
                del ws.cache[old]
            masks = ws.cache[key] = sparse_masks(targets, seed, density)
        shapes = {n: tuple(linear.weight.shape) for n, linear in targets.items()}
        start = decode_global_values(task.blobs, task.assign.round, shapes, masks, seed, density)
        with sparse_deltas(model, targets, masks, start) as deltas:
            if task.assign.kind == "eval":
                with parametrize.cached():
                    result = _evaluate(model, tokenizer, params, ws)
                _remember_eval(ws, task.assign.run_id, task.assign.round, result)
                return result
            lr = params.sparse.stage1_lr(params.train.lr)
            output = _train(model, tokenizer, params, task.assign.round, ws, lr)
            values = {
                n: d.detach().to("cpu", torch.float32).contiguous() for n, d in deltas.items()
            }
        output.blobs[spec.UPDATE_BLOB] = payloads.encode_masked(
            values, shapes, seed=seed, density=density, method=self.name, round=task.assign.round
        )
        output.metrics["masked_values"] = float(sum(v.numel() for v in values.values()))
        return output

    def _stage2(self, task: TaskInput, ws: Workspace, params: spec.Params) -> TaskOutput:
        if spec.GLOBAL_BLOB not in task.blobs:
            raise PayloadRejected("a stage-2 task must carry the global adapter")
        peft_model, tokenizer = peft_model_for(task, ws, params.lora)
        load_global(peft_model, task.blobs, task.assign.round, params.lora)
        if task.assign.kind == "eval":
            return _evaluate(peft_model, tokenizer, params, ws)
        from edge_agent.training.lora import get_adapter_state

        switch = (
            _switch_metrics(peft_model, tokenizer, params, ws, task) if params.switch_eval else {}
        )
        output = _train(peft_model, tokenizer, params, task.assign.round, ws, params.train.lr)
        output.metrics.update(switch)
        output.blobs[spec.UPDATE_BLOB] = payloads.encode_lora(
            get_adapter_state(peft_model), method=self.name, round=task.assign.round
        )
        return output


def _train(
    model: Any, tokenizer: Any, params: spec.Params, round: int, ws: Workspace, lr: float
) -> TaskOutput:
    result = train_task(model, tokenizer, ws, params.train, round, lr=lr)
    log.info(
        "round %d (stage %d): trained %d steps, loss %.4f → %.4f",
        round,
        params.stage,
        result.steps,
        result.first_loss,
        result.last_loss,
    )
    return training_output(result)


def _evaluate(model: Any, tokenizer: Any, params: spec.Params, ws: Workspace) -> TaskOutput:
    return evaluation_task(model, tokenizer, params.eval, ws)


EVALS_KEY = "slora-evals"
EVAL_METRICS = ("eval_loss", "eval_em", "eval_rouge_l")


def _remember_eval(ws: Workspace, run_id: str, round: int, result: TaskOutput) -> None:
    """Keep this agent's stage-1 evaluations of the run (the base, the sparse globals) for the
    switch round's comparison; another run's are dropped."""
    kept = ws.cache.get(EVALS_KEY)
    if not isinstance(kept, dict) or kept.get("run_id") != run_id:
        kept = ws.cache[EVALS_KEY] = {"run_id": run_id, "rounds": {}}
    kept["rounds"][round] = {k: v for k, v in result.metrics.items() if k in EVAL_METRICS}


def _switch_metrics(
    model: Any, tokenizer: Any, params: spec.Params, ws: Workspace, task: TaskInput
) -> dict[str, float]:
    """The switch's adapter evaluated before any stage-2 training, beside this agent's
    evaluations of the base and of the last stage-1 global when it made them."""
    result = _evaluate(model, tokenizer, params, ws)
    out = {f"switch_{k}": v for k, v in result.metrics.items() if k in EVAL_METRICS}
    out["switch_eval_examples"] = float(result.num_examples)
    kept = ws.cache.get(EVALS_KEY)
    rounds = (
        kept["rounds"] if isinstance(kept, dict) and kept["run_id"] == task.assign.run_id else {}
    )
    for label, round in (("base", 0), ("sparse", params.sparse.stage1_rounds)):
        for k, v in rounds.get(round, {}).items():
            out[f"switch_{k.replace('eval_', f'eval_{label}_')}"] = v
    log.info(
        "round %d: the switch's adapter scores eval loss %.4f before stage-2 training",
        task.assign.round,
        result.metrics["eval_loss"],
    )
    return out


Client = SloraClient
