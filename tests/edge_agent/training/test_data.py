"""Loading, validating, splitting, rendering and tokenizing the agent's private data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_agent.errors import ConfigError, DataError
from edge_agent.training.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    load_jsonl,
    normalize_answer,
    render,
    split_holdout,
    tokenize,
)

GOOD_LINES = [
    {"instruction": "Capital of France?", "output": "Paris"},
    {"instruction": "Translate", "input": "chat", "output": "cat", "category": "extra keys ok"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {"text": "Plain text to learn in full."},
]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer: Any) -> Any:
    return embedded_tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: Any) -> Any:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


# ----------------------------------------------------------------------------------- load_jsonl


def test_load_all_three_formats(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD_LINES[0], "", GOOD_LINES[1], *GOOD_LINES[2:]])
    examples = load_jsonl(path)
    assert examples == [
        Example(prompt="Capital of France?", response="Paris"),
        Example(prompt="Translate\n\nchat", response="cat"),
        Example(
            prompt=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
            ],
            response="4",
        ),
        Example(prompt="", response="", text="Plain text to learn in full."),
    ]


def test_load_max_records_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in GOOD_LINES).encode())
    assert len(load_jsonl(path)) == 4
    assert [ex.response for ex in load_jsonl(path, max_records=2)] == ["Paris", "cat"]


BAD_RECORDS = [
    ("[1, 2]", "expected a JSON object, got array"),
    ('{"instruction": "q"', "not valid JSON"),
    ('{"question": "q", "answer": "a"}', "expected keys"),
    ('{"instruction": "q"}', "missing key 'output'"),
    ('{"instruction": 3, "output": "a"}', "'instruction' must be a string, got number"),
    ('{"instruction": "q", "output": ["a"]}', "'output' must be a string, got array"),
    ('{"instruction": "q", "input": 5, "output": "a"}', "'input' must be a string or null"),
    ('{"instruction": "q", "output": "  "}', "'output' is empty"),
    ('{"instruction": "q", "output": "a", "text": "t"}', "ambiguous record"),
    ('{"text": null}', "'text' must be a string, got null"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages[0] must be an object, got string"),
    (
        '{"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "messages[0].role 'human' is not one of",
    ),
    (
        '{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}',
        "messages[0].content must be a string, got number",
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}',
        "the last message must have role 'assistant'",
    ),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "needs a user message"),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "a"}]}',
        "messages[1]: a system message may only come first",
    ),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_RECORDS)
def test_first_bad_line_is_reported_with_file_and_line(
    tmp_path: Path, bad: str, reason: str
) -> None:
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad, line 5 also bad.
    path = write_lines(tmp_path / "d.jsonl", [GOOD_LINES[0], "", GOOD_LINES[3], bad, "nonsense"])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert reason in message


def test_not_utf8_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD_LINES[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"not valid UTF-8") as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no records") as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:1: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert str(info.value) == f"{path}: cannot read data file (No such file or directory)"


# ---------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_partitions() -> None:
    examples = [Example(prompt=f"q{i}", response=f"a{i}") for i in range(50)]
    train, held = split_holdout(examples, 0.2, seed=7)
    assert (len(train), len(held)) == (40, 10)
    assert (train, held) == split_holdout(examples, 0.2, seed=7)
    assert sorted(ex.prompt for ex in train + held) == sorted(ex.prompt for ex in examples)
    # original order is kept inside each part
    assert [ex.prompt for ex in train] == [ex.prompt for ex in examples if ex in train]
    _, other = split_holdout(examples, 0.2, seed=8)
    assert other != held
    assert split_holdout(examples[:3], 0.1, seed=0)[1] != []  # at least one held out
    assert split_holdout(examples[:1], 0.5, seed=0) == (examples[:1], [])  # never empties train
    assert split_holdout(examples, 0.0, seed=0) == (examples, [])
    with pytest.raises(ConfigError):
        split_holdout(examples, 1.0, seed=0)


# ------------------------------------------------------------------------------- render/tokenize


def test_render_with_chat_template(tokenizer: Any) -> None:
    prompt, response = render(Example("Capital of France?", "Paris"), tokenizer)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "Paris<|im_end|>\n"
    chat = Example([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "A")
    assert render(chat, tokenizer) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
        "A<|im_end|>\n",
    )
    assert render(Example("", "", text="raw"), tokenizer) == ("", "raw<|im_end|>")


def test_render_plain_format_without_template(plain_tokenizer: Any) -> None:
    assert render(Example("Capital of France?", "Paris"), plain_tokenizer) == (
        "### Instruction:\nCapital of France?\n\n### Response:\n",
        "Paris<|im_end|>",
    )


def test_tokenize_masks_exactly_the_prompt(tokenizer: Any) -> None:
    example = Example("Capital of France?", "Paris")
    prompt, response = render(example, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 10 and len(response_ids) == 3  # "Paris", <|im_end|>, "\n"
    (tok,) = tokenize([example], tokenizer, max_len=128)
    assert tok.input_ids == prompt_ids + response_ids
    assert tok.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert tok.num_target_tokens == 3
    targets = [t for t in tok.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "Paris<|im_end|>\n"


def test_tokenize_text_record_trains_on_everything(tokenizer: Any) -> None:
    (tok,) = tokenize([Example("", "", text="hello world")], tokenizer, max_len=128)
    assert tok.labels == tok.input_ids
    assert tok.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tok.input_ids) == "hello world<|im_end|>"


def test_tokenize_truncates_keeping_room_for_the_response(tokenizer: Any) -> None:
    long_answer = Example("Q?", " ".join(["word"] * 100))
    (tok,) = tokenize([long_answer], tokenizer, max_len=32)
    prompt_ids = tokenizer(render(long_answer, tokenizer)[0], add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) == 32  # whole prompt > max_len // 2: cut to 16 of its last tokens
    assert len(tok.input_ids) == len(tok.labels) == 32
    assert tok.input_ids[:16] == prompt_ids[-16:]
    assert tok.labels[:16] == [IGNORE_INDEX] * 16
    assert tok.num_target_tokens == 16

    long_prompt = Example(" ".join(["word"] * 100), "Paris")
    (tok,) = tokenize([long_prompt], tokenizer, max_len=32)
    assert len(tok.input_ids) == 32
    assert tok.num_target_tokens == 3  # the short response is kept whole
    # the prompt keeps its end, where the assistant header is
    assert tokenizer.decode(tok.input_ids).endswith("<|im_start|>assistant\nParis<|im_end|>\n")

    with pytest.raises(ConfigError):
        tokenize([long_prompt], tokenizer, max_len=1)


def test_tokenize_plain_format(plain_tokenizer: Any) -> None:
    (tok,) = tokenize([Example("Q?", "A")], plain_tokenizer, max_len=64)
    n_prompt = tok.labels.count(IGNORE_INDEX)
    assert (
        plain_tokenizer.decode(tok.input_ids[:n_prompt])
        == "### Instruction:\nQ?\n\n### Response:\n"
    )
    assert plain_tokenizer.decode(tok.input_ids[n_prompt:]) == "A<|im_end|>"


def test_collate_pads_right_or_left() -> None:
    batch = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    ids, attention, labels = collate(batch, 0, torch.device("cpu"), left=False)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    ids, attention, labels = collate(batch, 9, torch.device("cpu"), left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert labels.tolist() == [[-100, 6, 7], [-100, -100, 8]]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("  Paris ", "paris"), ("New\n  York\tCity", "new york city"), ("STRASSE", "strasse")],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected
    assert normalize_answer("Straße") == normalize_answer("STRASSE")
