"""What several client halves share: evaluating a model as an eval task asks."""

from __future__ import annotations

from typing import Any

from edge_agent.errors import TaskError
from edge_agent.methods import TaskOutput, Workspace
from protocol.methods._common import EvalParams


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
