"""Local LoRA training on the agent's private examples.

The loop reads top to bottom: tokenize once, draw a deterministic batch order from
``cfg.seed``, then for each step pad a batch, compute the mean cross-entropy over response tokens
(fp32, whatever the compute dtype), add the caller's ``extra_loss`` (FedBiOT's proximal term),
clip and step AdamW over the trainable parameters only. The base model may be quantized
(bitsandbytes NF4/int8); a bf16/fp16 compute dtype runs under autocast.

Evaluation lives in :mod:`edge_agent.training.evaluate`; ``evaluate``, ``EvalResult`` and
``greedy_continuations`` are importable from here too.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from edge_agent.errors import ConfigError, DataError, TaskError
from edge_agent.training._forward import (
    accepts_logits_to_keep,
    autocast,
    compute_dtype,
    device_of,
    forward_ce,
    pad_token_id,
)
from edge_agent.training.data import Example, collate, tokenize
from edge_agent.training.evaluate import EvalResult, evaluate, greedy_continuations

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "greedy_continuations",
    "train_lora",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters (one round's worth of steps)."""

    steps: int
    batch_size: int
    lr: float
    max_len: int = 128
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if self.max_len < 2:
            problems.append(f"max_len must be >= 2, got {self.max_len}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            problems.append(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))


@dataclass
class TrainResult:
    """What a local training run did. Losses are the task CE only (``extra_loss`` excluded);
    they are NaN when no step ran (stopped before the first step)."""

    num_examples: int
    steps: int
    mean_loss: float
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_lora(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    progress: bool = False,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (its LoRA adapter) for ``cfg.steps`` steps.

    ``should_stop`` is polled before each step (a daemon shutting down): when it returns True
    the run ends and reports the steps done. ``on_step(steps_done)`` is called after each step.
    """
    if not examples:
        raise DataError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TaskError("the model has no trainable parameters (is a LoRA adapter attached?)")
    data = tokenize(examples, tokenizer, cfg.max_len)
    device = device_of(model)
    amp_dtype = compute_dtype(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (cfg.warmup_steps + 1))
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    order = _batch_order(len(data), cfg.batch_size, cfg.seed)
    pad_id = pad_token_id(tokenizer)
    slim = accepts_logits_to_keep(model)
    losses: list[float] = []
    was_training = model.training
    model.train()
    start = time.perf_counter()
    rng_devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=cfg.steps, disable=not progress, file=sys.stderr, desc="local training")
    try:
        with torch.random.fork_rng(devices=rng_devices):  # dropout is seeded, caller RNG untouched
            torch.manual_seed(cfg.seed)
            for step in range(cfg.steps):
                if should_stop is not None and should_stop():
                    logger.info("training stopped early after %d of %d steps", step, cfg.steps)
                    break
                input_ids, attention, labels = collate(
                    [data[i] for i in next(order)], pad_id, device, left=False
                )
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, amp_dtype):
                    loss_sum, count = forward_ce(model, input_ids, attention, labels, slim)
                loss = loss_sum / count.clamp(min=1)
                total = loss if extra_loss is None else loss + extra_loss(model)
                if not torch.isfinite(total):
                    raise TaskError(f"training diverged: loss is {total.item()} at step {step}")
                if scaler is not None:
                    scaler.scale(total).backward()
                    scaler.unscale_(optimizer)
                else:
                    total.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if on_step is not None:
                    on_step(len(losses))
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    nan = float("nan")
    result = TrainResult(
        num_examples=len(examples),
        steps=len(losses),
        mean_loss=sum(losses) / len(losses) if losses else nan,
        first_loss=losses[0] if losses else nan,
        last_loss=losses[-1] if losses else nan,
        losses=losses,
        seconds=seconds,
    )
    logger.info(
        "trained %d steps on %d examples in %.1fs: loss %.4f -> %.4f",
        result.steps,
        result.num_examples,
        seconds,
        result.first_loss,
        result.last_loss,
    )
    return result


def _batch_order(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches over a fresh permutation per epoch (CPU generator: same on any device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def indices() -> Iterator[int]:
        while True:
            yield from torch.randperm(n, generator=generator).tolist()

    stream = indices()
    while True:
        yield [next(stream) for _ in range(batch_size)]
