"""The agent's private data: JSON-lines loading, hold-out split, rendering, tokenizing, padding.

Three record shapes are accepted, one JSON object per line (blank lines are skipped, unknown
extra keys are ignored so that dataset metadata such as ``category`` or ``id`` can stay):

- ``{"instruction": str, "input"?: str | null, "output": str, "references"?: [str, ...]}``
  (Alpaca / Dolly style; ``references`` are further acceptable answers, used only to score);
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` ending with an
  assistant turn, which is the training target (everything before it is the prompt);
- ``{"text": str}``: plain text, trained on in full.

Every line is validated; the first bad one raises :class:`DataError` whose message starts with
``"<path>:<line>:"`` so a user can jump to it.

Tokenization keeps prompt and response as separately tokenized pieces concatenated, so the label
mask (``-100`` on the prompt) is exact, never an estimate from a re-tokenized prefix.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_agent.errors import ConfigError, DataError
from edge_agent.training import truncation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PLAIN_INSTRUCTION = "### Instruction:\n"
_PLAIN_RESPONSE = "### Response:\n"


@dataclass(frozen=True)
class Example:
    """One training record.

    ``prompt`` is the instruction (with its input appended) or the chat messages before the final
    assistant turn; ``response`` is the target; ``text`` is set (and ``response`` empty) for plain
    text records, which are trained on in full.
    """

    prompt: str | list[dict[str, str]]
    response: str
    text: str | None = None
    references: tuple[str, ...] = ()
    """Other acceptable answers for scoring (an instruction record's optional
    ``"references"`` list); ``response`` always counts as one."""

    @property
    def answers(self) -> tuple[str, ...]:
        """Every acceptable answer: the response, then the other references."""
        return (self.response, *(r for r in self.references if r != self.response))


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; ``labels`` is ``input_ids`` with the prompt set to ``-100``."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# --------------------------------------------------------------------------------------- loading


def load_jsonl(path: Path, *, max_records: int | None = None) -> list[Example]:
    """Read and validate a JSON-lines file; stop after ``max_records`` records if given."""
    path = Path(path)
    if max_records is not None and max_records < 1:
        raise DataError(f"{path}: max_records must be at least 1, got {max_records}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file ({exc.strerror or exc})") from exc
    examples: list[Example] = []
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line)"
            ) from exc
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        try:
            examples.append(_parse_record(record))
        except _RecordError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        if max_records is not None and len(examples) >= max_records:
            break
    if not examples:
        raise DataError(f"{path}:1: file has no records (expected one JSON object per line)")
    logger.debug("loaded %d examples from %s", len(examples), path)
    return examples


class _RecordError(Exception):
    """What is wrong with one record; turned into a DataError with file and line."""


def _parse_record(record: Any) -> Example:
    if not isinstance(record, dict):
        raise _RecordError(f"expected a JSON object, got {_json_type(record)}")
    shapes = [key for key in ("instruction", "messages", "text") if key in record]
    if len(shapes) > 1:
        raise _RecordError(f"ambiguous record: has keys {shapes}; use exactly one record shape")
    if not shapes:
        raise _RecordError(
            f"expected keys 'instruction'+'output', 'messages' or 'text', got {sorted(record)[:8]}"
        )
    if shapes[0] == "instruction":
        return _parse_instruction(record)
    if shapes[0] == "messages":
        return _parse_messages(record["messages"])
    text = record["text"]
    _require_text("text", text)
    return Example(prompt="", response="", text=text)


def _parse_instruction(record: dict[str, Any]) -> Example:
    instruction = record["instruction"]
    _require_text("instruction", instruction)
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _RecordError(f"'input' must be a string or null, got {_json_type(extra)}")
    if "output" not in record:
        raise _RecordError("missing key 'output'")
    output = record["output"]
    _require_text("output", output)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    refs = record.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise _RecordError("'references' must be a list of strings")
    return Example(prompt=prompt, response=output, references=tuple(refs))


def _parse_messages(messages: Any) -> Example:
    if not isinstance(messages, list) or not messages:
        raise _RecordError("'messages' must be a non-empty list")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RecordError(f"messages[{i}] must be an object, got {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise _RecordError(f"messages[{i}].role must be a string, got {_json_type(role)}")
        if role not in ROLES:
            raise _RecordError(f"messages[{i}].role {role!r} is not one of {list(ROLES)}")
        if role == "system" and i != 0:
            raise _RecordError(f"messages[{i}]: a system message may only come first")
        if not isinstance(content, str):
            raise _RecordError(f"messages[{i}].content must be a string, got {_json_type(content)}")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        raise _RecordError("the last message must have role 'assistant' (the training target)")
    if not any(turn["role"] == "user" for turn in turns[:-1]):
        raise _RecordError("'messages' needs a user message before the final assistant message")
    if not turns[-1]["content"].strip():
        raise _RecordError("the final assistant message is empty")
    return Example(prompt=turns[:-1], response=turns[-1]["content"])


def _require_text(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _RecordError(f"{key!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _RecordError(f"{key!r} is empty")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    return "number" if isinstance(value, int | float) else type(value).__name__


# ---------------------------------------------------------------------------------------- split


def split_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, holdout), each in original order; the same seed gives the same split.

    The holdout has ``round(len * fraction)`` examples, at least one when ``fraction > 0`` and at
    least one example is left for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    k = round(n * fraction)
    if fraction > 0 and k == 0 and n > 1:
        k = 1
    k = min(k, max(n - 1, 0))
    held = set(random.Random(seed).sample(range(n), k))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    holdout = [ex for i, ex in enumerate(examples) if i in held]
    return train, holdout


# ------------------------------------------------------------------------------------ rendering


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(example: Example, tokenizer: Any) -> tuple[str, str]:
    """Return (prompt text, response text), the response ending with the turn's end marker.

    With a chat template the prompt is the template applied to the user turn(s) with
    ``add_generation_prompt=True`` and the response is what the template adds for the final
    assistant turn (e.g. ``"answer<|im_end|>\\n"``). Without one the prompt is
    ``"### Instruction:\\n...\\n\\n### Response:\\n"`` and the response ends with the EOS token.
    Plain ``text`` records render as ``("", text + eos)``.
    """
    eos = tokenizer.eos_token or ""
    if example.text is not None:
        return "", example.text + eos
    if has_chat_template(tokenizer):
        messages = _as_messages(example.prompt)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if isinstance(prompt, str) and isinstance(full, str) and full.startswith(prompt):
            return prompt, full[len(prompt) :]
        if isinstance(prompt, str):
            # A template that rewrites earlier turns once an answer follows: keep the prompt
            # exactly as generation will see it, end the answer with EOS.
            return prompt, example.response + eos
        raise DataError("the tokenizer's chat template did not render to text")
    return _plain_prompt(example.prompt), example.response + eos


def _as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _plain_prompt(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return f"{_PLAIN_INSTRUCTION}{prompt}\n\n{_PLAIN_RESPONSE}"
    parts: list[str] = []
    for turn in prompt:
        if turn["role"] == "system":
            parts.append(f"{turn['content']}\n\n")
        elif turn["role"] == "user":
            parts.append(f"{_PLAIN_INSTRUCTION}{turn['content']}\n\n")
        else:
            parts.append(f"{_PLAIN_RESPONSE}{turn['content']}\n\n")
    return "".join(parts) + _PLAIN_RESPONSE


# --------------------------------------------------------------------------------- tokenization


def prompt_ids(example: Example, tokenizer: Any, max_len: int | None = None) -> list[int]:
    """Token ids of the rendered prompt (what generation starts from), left-truncated."""
    prompt, _ = render(example, tokenizer)
    ids = _encode(tokenizer, prompt, add_special=_adds_special(example, tokenizer))
    return ids[-max_len:] if max_len is not None and len(ids) > max_len else ids


def tokenize(examples: Sequence[Example], tokenizer: Any, max_len: int) -> list[TokenizedExample]:
    """Tokenize prompt and response separately and concatenate; labels are -100 on the prompt.

    Sequences longer than ``max_len`` are cut so that the response keeps room: the prompt keeps
    its last ``max(max_len - len(response), max_len // 2)`` tokens (the end of a prompt, where the
    assistant header is, matters most) and the response is cut on the right. How many were cut,
    and by how much, is logged and counted in the task's metrics (:mod:`edge_agent.training.truncation`).
    """
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2, got {max_len}")
    out: list[TokenizedExample] = []
    counts = truncation.Truncation()
    for example in examples:
        prompt, response = render(example, tokenizer)
        p_ids = _encode(tokenizer, prompt, add_special=_adds_special(example, tokenizer))
        r_ids = _encode(tokenizer, response, add_special=False)
        counts.cut(len(p_ids) + len(r_ids), max_len)
        if len(p_ids) + len(r_ids) > max_len:
            keep_p = min(len(p_ids), max(max_len - len(r_ids), max_len // 2))
            p_ids = p_ids[len(p_ids) - keep_p :]
            r_ids = r_ids[: max_len - keep_p]
        out.append(
            TokenizedExample(input_ids=p_ids + r_ids, labels=[IGNORE_INDEX] * len(p_ids) + r_ids)
        )
    truncation.report(counts, max_len)  # logged, and added to the running task's metrics
    return out


def _adds_special(example: Example, tokenizer: Any) -> bool:
    # A chat template writes its own special tokens (BOS included) into the text; otherwise let
    # the tokenizer add what it adds by default (e.g. Llama's BOS) in front of the prompt.
    return example.text is not None or not has_chat_template(tokenizer)


def _encode(tokenizer: Any, text: str, *, add_special: bool) -> list[int]:
    if not text and not add_special:
        return []
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    return [int(i) for i in ids]


def collate(
    batch: Sequence[TokenizedExample], pad_id: int, device: torch.device, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest sequence: (input_ids, attention_mask, labels) on ``device``.

    Right padding for training and scoring, ``left=True`` for batched generation; padded
    positions have attention 0 and label -100, so any ``pad_id`` is safe.
    """
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention[row, span] = 1
        labels[row, span] = torch.tensor(ex.labels, dtype=torch.long)
    return ids.to(device), attention.to(device), labels.to(device)


_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalisation for exact match: strip, collapse whitespace runs to one space, casefold."""
    return _SPACES.sub(" ", text.strip()).casefold()
