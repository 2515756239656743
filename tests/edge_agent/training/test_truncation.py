"""tokenize says how many examples it truncated and by how much, in the log and the task's metrics."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from edge_agent.training import truncation
from edge_agent.training.data import Example, tokenize


@pytest.fixture
def tokenizer(embedded_tokenizer: Any) -> Any:
    return embedded_tokenizer


def test_truncation_is_logged_and_counted_for_the_task(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    short = Example(prompt="Hi", response="Yes")
    long = Example(prompt="word " * 200, response="a long answer " * 5)
    full = [len(t.input_ids) for t in tokenize([short, long], tokenizer, 4096)]
    max_len = full[0] + 4
    assert full[1] > max_len
    with (
        caplog.at_level(logging.WARNING, logger="edge_agent.training.truncation"),
        truncation.collecting() as cut,
    ):
        tokenize([short, long, long], tokenizer, max_len)
        tokenize([short], tokenizer, max_len)  # a second call in the same task adds up
    assert (cut.examples, cut.truncated) == (4, 2)
    assert cut.tokens_cut == 2 * (full[1] - max_len)
    assert cut.metrics() == {
        "truncated_examples": 2.0,
        "truncated_tokens_mean": float(full[1] - max_len),
        "truncated_tokens_max": float(full[1] - max_len),
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"2 of 3 examples are longer than max_len={max_len}" in warnings[0]
    assert f"at most {full[1] - max_len}" in warnings[0]


def test_nothing_truncated_says_zero_and_warns_nothing(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), truncation.collecting() as cut:
        tokenize([Example(prompt="Hi", response="Yes")], tokenizer, 4096)
    assert cut.metrics()["truncated_examples"] == 0.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_outside_a_task_nothing_is_collected(tokenizer: Any) -> None:
    tokenize([Example(prompt="word " * 50, response="x")], tokenizer, 8)  # only logs
    with truncation.collecting() as cut:
        pass
    assert cut.examples == 0
