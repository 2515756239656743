"""What several client halves share: the one LoRA adapter on a cached base, a round of local
training, and evaluating as an eval task asks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edge_agent.errors import TaskError
from edge_agent.methods import TaskOutput, Workspace
from edge_agent.training.lora import LoraSpec, attach_lora
from protocol.messages import TaskAssign
from protocol.methods._common import EvalParams, TrainParams

ADAPTER = "adapter"
"""``ws.cache`` key of the LoRA adapter attached to a cached base: ``(key, peft_model, tokenizer)``."""


def attached_adapter(
    ws: Workspace,
    assign: TaskAssign,
    shape: LoraSpec,
    init_seed: int,
    key: object,
    *,
    last_layers: int | None = None,
) -> tuple[Any, Any]:
    """A peft model with an adapter of ``shape`` on the task's base, reused while ``key`` is the
    same. A base carries one adapter at a time, whichever method attached it (FedIT, SLoRA's
    stage 2, FedPipe, FedBiOT's evaluation): any other is unloaded first, so an agent can run
    their tasks in turn. ``last_layers``: adapt only the base's last that many decoder layers."""
    cached = ws.cache.get(ADAPTER)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    release_adapter(ws)
    base, tokenizer = ws.base(assign.model, assign.quant)
    if last_layers is not None:
        shape = replace(shape, layers=last_layer_indices(base, last_layers))
    peft_model = attach_lora(base, shape, init_seed=init_seed)
    ws.cache[ADAPTER] = (key, peft_model, tokenizer)
    return peft_model, tokenizer


def last_layer_indices(model: Any, n: int) -> tuple[int, ...]:
    """The indices of ``model``'s last ``n`` decoder layers (by its config)."""
    total = int(model.config.num_hidden_layers)
    if not 1 <= n <= total:
        raise TaskError(f"the model has {total} decoder layers; cannot adapt the last {n}")
    return tuple(range(total - n, total))


def release_adapter(ws: Workspace) -> None:
    """Unload the attached adapter, if any: the cached base gets its plain modules back."""
    cached = ws.cache.pop(ADAPTER, None)
    if cached is not None:
        cached[1].unload()


def evaluation_task(model: Any, tokenizer: Any, e: EvalParams, ws: Workspace) -> TaskOutput:
    """Loss (and exact match) of ``model`` on the agent's held-out examples."""
    from edge_agent.training.train import evaluate

    examples = ws.eval_examples[: e.max_examples]
    if not examples:
        raise TaskError("no held-out examples to evaluate on")
    result = evaluate(
        model,
        tokenizer,
        examples,
        max_len=e.max_len,
        batch_size=e.batch_size,
        exact_match=e.exact_match,
        max_new_tokens=e.max_new_tokens,
        progress=ws.progress,
    )
    metrics = {"eval_loss": result.loss, "seconds": result.seconds}
    if result.exact_match is not None:
        metrics["eval_em"] = result.exact_match
    if result.rouge_l is not None:
        metrics["eval_rouge_l"] = result.rouge_l
    return TaskOutput(num_examples=result.n, metrics=metrics)


def training_output(result: Any, blobs: dict[str, bytes] | None = None) -> TaskOutput:
    """A train task's answer from ``edge_agent.training.train.TrainResult``: losses, steps, time."""
    return TaskOutput(
        num_examples=result.num_examples,
        metrics={
            "train_loss": result.mean_loss,
            "train_loss_last": result.last_loss,
            "steps": float(result.steps),
            "seconds": result.seconds,
        },
        blobs=blobs or {},
    )


def train_task(
    model: Any,
    tokenizer: Any,
    ws: Workspace,
    t: TrainParams,
    round: int,
    *,
    lr: float | None = None,
    extra_loss: Callable[[Any], Any] | None = None,
    after_step: Callable[[], None] | None = None,
) -> Any:
    """One round of local training on the agent's examples: ``t``'s steps (seeded by the
    round), with the workspace's progress, stop and progress-bar hooks; a ``TrainResult``.
    ``after_step`` runs after each optimizer step, while the step's gradients are still set."""
    from edge_agent.training.train import TrainConfig, train_lora

    cfg = TrainConfig(
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr if lr is None else lr,
        max_len=t.max_len,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        seed=t.seed + round,
        gradient_checkpointing=t.gradient_checkpointing,
    )

    def _after(done: int) -> None:
        if after_step is not None:
            after_step()
        ws.report_progress(done / cfg.steps)

    return train_lora(
        model,
        tokenizer,
        ws.train_examples,
        cfg,
        progress=ws.progress,
        extra_loss=extra_loss,
        should_stop=ws.should_stop,
        on_step=_after,
    )
