"""What several client halves share: a round of local training, and evaluating as an eval task asks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_agent.errors import TaskError
from edge_agent.methods import TaskOutput, Workspace
from protocol.methods._common import EvalParams, TrainParams


def evaluation_task(model: Any, tokenizer: Any, e: EvalParams, ws: Workspace) -> TaskOutput:
    """Loss (and exact match) of ``model`` on the agent's held-out examples."""
    from edge_agent.train import evaluate

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
    return TaskOutput(num_examples=result.n, metrics=metrics)


def training_output(result: Any, blobs: dict[str, bytes] | None = None) -> TaskOutput:
    """A train task's answer from ``edge_agent.train.TrainResult``: losses, steps, time."""
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
) -> Any:
    """One round of local training on the agent's examples: ``t``'s steps (seeded by the
    round), with the workspace's progress, stop and progress-bar hooks; a ``TrainResult``."""
    from edge_agent.train import TrainConfig, train_lora

    cfg = TrainConfig(
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr if lr is None else lr,
        max_len=t.max_len,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        seed=t.seed + round,
    )
    return train_lora(
        model,
        tokenizer,
        ws.train_examples,
        cfg,
        progress=ws.progress,
        extra_loss=extra_loss,
        should_stop=ws.should_stop,
        on_step=lambda done: ws.report_progress(done / cfg.steps),
    )
