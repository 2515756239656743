"""Client halves of the methods, and the interface they implement.

A client method never touches sockets: it takes a task (header, parsed parameters, blobs) and
a :class:`Workspace` (the base model, the agent's private data, cancellation and progress
hooks) and returns a :class:`TaskOutput` of plain data. The daemon does the I/O around it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from protocol.messages import BaseModelRef, TaskAssign

if TYPE_CHECKING:
    from edge_agent.daemon.objects import ObjectStore
    from edge_agent.training.data import Example


@dataclass(frozen=True)
class TaskInput:
    assign: TaskAssign
    params: BaseModel
    blobs: Mapping[str, memoryview]


@dataclass
class TaskOutput:
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


class Workspace(Protocol):
    """What the daemon lends a method for one task."""

    @property
    def train_examples(self) -> list[Example]: ...

    @property
    def eval_examples(self) -> list[Example]: ...

    @property
    def progress(self) -> bool: ...

    @property
    def cache(self) -> dict[str, Any]:
        """Objects a method keeps between tasks (e.g. its peft model), keyed by its own names."""
        ...

    @property
    def objects(self) -> ObjectStore:
        """Large objects kept across tasks and restarts by sha256 (listed in Hello.holds)."""
        ...

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        """The base model and tokenizer, loaded once per (model, quant) and kept.

        Raises :class:`edge_agent.errors.TaskError` when the agent's model has another hash.
        """
        ...

    def should_stop(self) -> bool: ...

    def report_progress(self, fraction: float) -> None: ...


class ClientMethod(Protocol):
    name: str

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput: ...


MethodFactory = Callable[[], ClientMethod]


def client_methods() -> dict[str, MethodFactory]:
    """Method name → factory of its client half (imported lazily: they pull in torch/peft)."""
    from protocol.methods import NAMES

    return {n: importlib.import_module(f"edge_agent.methods.{n}").Client for n in NAMES}
