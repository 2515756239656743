"""How much :func:`edge_agent.training.data.tokenize` cut, said in the agent log and in the task's metrics.

``tokenize`` calls :func:`report` once per call with what it cut; that logs a WARNING when any
example was truncated (the operator should raise ``max_len``: the cut part of a prompt is never
seen) and adds the counts to the task being run. The worker runs each task inside
:func:`collecting` and adds :meth:`Truncation.metrics` to the result's metrics:
``truncated_examples`` (examples cut, over all tokenize calls of the task: training and
evaluation), ``truncated_tokens_mean`` (tokens cut per truncated example) and
``truncated_tokens_max``. A task that truncated nothing reports ``truncated_examples = 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Truncation:
    """Counts over one or more tokenize calls."""

    examples: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    max_cut: int = 0

    def add(self, other: Truncation) -> None:
        self.examples += other.examples
        self.truncated += other.truncated
        self.tokens_cut += other.tokens_cut
        self.max_cut = max(self.max_cut, other.max_cut)

    def cut(self, length: int, max_len: int) -> None:
        """One example of ``length`` tokens, kept to ``max_len``."""
        self.examples += 1
        if length > max_len:
            self.truncated += 1
            self.tokens_cut += length - max_len
            self.max_cut = max(self.max_cut, length - max_len)

    def metrics(self) -> dict[str, float]:
        mean = self.tokens_cut / self.truncated if self.truncated else 0.0
        return {
            "truncated_examples": float(self.truncated),
            "truncated_tokens_mean": round(mean, 2),
            "truncated_tokens_max": float(self.max_cut),
        }


_task: ContextVar[Truncation | None] = ContextVar("edgefed_truncation", default=None)


@contextmanager
def collecting() -> Iterator[Truncation]:
    """Sum what every tokenize call made while this block runs (on this thread) does."""
    total = Truncation()
    token = _task.set(total)
    try:
        yield total
    finally:
        _task.reset(token)


def report(counts: Truncation, max_len: int) -> None:
    """Log one tokenize call's truncation and add it to the running task's counts."""
    if counts.truncated:
        log.warning(
            "%d of %d examples are longer than max_len=%d and were truncated "
            "(by %.0f tokens on average, at most %d): raise max_len in [method.train] / "
            "[method.eval] to keep them whole",
            counts.truncated,
            counts.examples,
            max_len,
            counts.tokens_cut / counts.truncated,
            counts.max_cut,
        )
    total = _task.get()
    if total is not None:
        total.add(counts)
