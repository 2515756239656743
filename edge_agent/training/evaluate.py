"""Evaluation of the agent's model on held-out examples: response loss and exact match.

``evaluate`` pads batches of the tokenized examples and sums the cross-entropy over response
tokens (fp32, token-weighted, under the model's compute dtype like training); with
``exact_match`` it greedy-decodes each prompt (``greedy_continuations``, left-padded batches) and
compares the normalized continuation with the expected response.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from edge_agent.errors import ConfigError, DataError
from edge_agent.training._forward import (
    accepts_logits_to_keep,
    autocast,
    compute_dtype,
    device_of,
    eos_token_ids,
    forward_ce,
    pad_token_id,
)
from edge_agent.training.data import (
    Example,
    TokenizedExample,
    collate,
    normalize_answer,
    prompt_ids,
    tokenize,
)


@dataclass
class EvalResult:
    """Token-weighted response CE over ``n`` examples, and exact match when it was asked for."""

    loss: float
    exact_match: float | None
    n: int
    seconds: float


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
    device = device_of(model)
    amp_dtype = compute_dtype(model)
    pad_id = pad_token_id(tokenizer)
    slim = accepts_logits_to_keep(model)
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
                with autocast(device, amp_dtype):
                    batch_sum, batch_count = forward_ce(model, input_ids, attention, labels, slim)
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

    device = device_of(model)
    amp_dtype = compute_dtype(model)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
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
                with autocast(device, amp_dtype):
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
