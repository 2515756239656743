"""Model plumbing shared by local training and evaluation.

The response-token cross-entropy of one padded batch (``forward_ce``), and what the loops need to
know about the model and tokenizer: its device, its compute dtype (and the autocast for it), the
pad id and the end-of-sequence ids.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch.nn import functional as F

from edge_agent.training.data import IGNORE_INDEX


def forward_ce(
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


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep`` (transformers >= 4.50)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """bf16/fp16 if the model computes in it (quantized base or half weights), else None."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and labels, any id will do


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))
