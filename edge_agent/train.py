"""Local LoRA training and evaluation on the agent's private examples.

The loop reads top to bottom: tokenize once, draw a deterministic batch order from
``cfg.seed``, then for each step pad a batch, compute the mean cross-entropy over response tokens
(fp32, whatever the compute dtype), add the caller's ``extra_loss`` (FedBiOT's proximal term),
clip and step AdamW over the trainable parameters only. The base model may be quantized
(bitsandbytes NF4/int8); a bf16/fp16 compute dtype runs under autocast.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from edge_agent.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    normalize_answer,
    prompt_ids,
    tokenize,
)
from edge_agent.errors import ConfigError, DataError, TaskError

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


@dataclass
class EvalResult:
    """Token-weighted response CE over ``n`` examples, and exact match when it was asked for."""

    loss: float
    exact_match: float | None
    n: int
    seconds: float


# ------------------------------------------------------------------------------------- training


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
    device = _device_of(model)
    amp_dtype = _compute_dtype(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (cfg.warmup_steps + 1))
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    order = _batch_order(len(data), cfg.batch_size, cfg.seed)
    pad_id = _pad_id(tokenizer)
    slim = _accepts_logits_to_keep(model)
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
                with _autocast(device, amp_dtype):
                    loss_sum, count = _forward_ce(model, input_ids, attention, labels, slim)
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


# ----------------------------------------------------------------------------------- evaluation


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_len: int = 128,
    batch_size: int = 8,
    exact_match: bool = False,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> EvalResult:
    """Response CE (token-weighted mean) and, if asked, greedy-decoding exact match.

    Exact match counts only examples with a non-empty response (plain text records have none);
    it is ``None`` when not asked for or when no example has a response.
    """
    if not examples:
        raise DataError("no evaluation examples")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    data = tokenize(examples, tokenizer, max_len)
    device = _device_of(model)
    amp_dtype = _compute_dtype(model)
    pad_id = _pad_id(tokenizer)
    slim = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        with torch.no_grad():
            batches = range(0, len(data), batch_size)
            for i in tqdm(batches, disable=not progress, file=sys.stderr, desc="eval loss"):
                input_ids, attention, labels = collate(
                    data[i : i + batch_size], pad_id, device, left=False
                )
                with _autocast(device, amp_dtype):
                    batch_sum, batch_count = _forward_ce(model, input_ids, attention, labels, slim)
                loss_sum += batch_sum.double().cpu()
                count += int(batch_count)
            em: float | None = None
            if exact_match:
                targets = [ex for ex in examples if ex.text is None and ex.response.strip()]
                if targets:
                    outputs = greedy_continuations(
                        model,
                        tokenizer,
                        targets,
                        max_len=max_len,
                        batch_size=batch_size,
                        max_new_tokens=max_new_tokens,
                        progress=progress,
                    )
                    hits = sum(
                        normalize_answer(out) == normalize_answer(ex.response)
                        for out, ex in zip(outputs, targets, strict=True)
                    )
                    em = hits / len(targets)
    finally:
        model.train(was_training)
    loss = float(loss_sum / count) if count else float("nan")
    return EvalResult(
        loss=loss, exact_match=em, n=len(examples), seconds=time.perf_counter() - start
    )


def greedy_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_len: int = 128,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy-decode each example's prompt (left-padded batches); decoded continuations."""
    from transformers import GenerationConfig

    device = _device_of(model)
    amp_dtype = _compute_dtype(model)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    prompts = [prompt_ids(ex, tokenizer, max_len) for ex in examples]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = range(0, len(prompts), batch_size)
            for i in tqdm(batches, disable=not progress, file=sys.stderr, desc="generate"):
                chunk = [TokenizedExample(ids, ids) for ids in prompts[i : i + batch_size]]
                input_ids, attention, _ = collate(chunk, pad_id, device, left=True)
                with _autocast(device, amp_dtype):
                    out = model.generate(  # type: ignore[operator]
                        input_ids=input_ids, attention_mask=attention, generation_config=config
                    )
                new = out[:, input_ids.shape[1] :]
                for row in new.tolist():
                    cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                    texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


# -------------------------------------------------------------------------------------- helpers


def _forward_ce(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    slim: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE (fp32) over positions whose label is not -100, and their count.

    With ``slim`` only the positions that predict a response token (in any row) go through the
    LM head (``logits_to_keep``), which spares the vocabulary-sized logits of the prompt.
    """
    targets = labels[:, 1:]
    if slim:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        logits = model(
            input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=keep
        ).logits
        targets = targets[:, keep]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        logits = logits[:, :-1, :]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep`` (transformers >= 4.50)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """bf16/fp16 if the model computes in it (quantized base or half weights), else None."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and labels, any id will do


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))
