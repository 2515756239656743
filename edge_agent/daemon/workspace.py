"""What the daemon lends a client method: the base model, the private data, stop and progress.

:class:`AgentWorkspace` implements :class:`edge_agent.methods.Workspace`. The model spec is
resolved (and converted, for a .gguf) once, lazily, so that ``Hello`` can announce its sha256;
weights are loaded on the first task that needs them and kept per quantization. The data file is
read once; evaluation uses ``eval_data`` when configured, else a seeded held-out split of ``data``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from edge_agent.daemon.objects import ObjectStore
from edge_agent.errors import TaskError
from protocol.errors import ErrorCode
from protocol.messages import BaseModelRef

if TYPE_CHECKING:
    from edge_agent.daemon.config import AgentConfig
    from edge_agent.training.data import Example

logger = logging.getLogger(__name__)

HOLDOUT_SEED = 0


class ResolvedLike(Protocol):
    """What :func:`edge_agent.model.store.resolve_model` returns."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def sha256(self) -> str: ...


class ModelMismatch(TaskError):
    """The task names a base model with another hash than the one this agent holds."""

    code = ErrorCode.MODEL_MISMATCH


@dataclass(frozen=True)
class WorkspaceSettings:
    model: str
    data: Path
    model_cache: Path | None = None
    eval_data: Path | None = None
    holdout_fraction: float = 0.1
    threads: int | None = None
    progress: bool = False
    objects_dir: Path | None = None
    """Where large objects are kept by sha256 (state_dir/objects); None: in a temporary dir."""

    @classmethod
    def from_config(cls, config: AgentConfig) -> WorkspaceSettings:
        a = config.agent
        return cls(
            model=a.model,
            data=a.data,
            model_cache=a.model_cache,
            eval_data=a.eval_data,
            holdout_fraction=a.holdout_fraction,
            threads=a.threads,
            progress=a.progress,
            objects_dir=a.state_dir / "objects",
        )


class AgentWorkspace:
    """The agent's one workspace, shared by every task the worker runs (one at a time)."""

    def __init__(self, settings: WorkspaceSettings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self._stop = stop or threading.Event()
        self._lock = threading.RLock()
        self._resolved: ResolvedLike | None = None
        self._data: tuple[list[Example], list[Example]] | None = None
        self._bases: dict[str, tuple[Any, Any]] = {}
        self._cache: dict[str, Any] = {}
        self._progress_fraction = 0.0
        self._objects: ObjectStore | None = None

    # --------------------------------------------------------------------------- startup checks

    def prepare(self) -> None:
        """Apply the thread count, read the data and resolve the model (user errors raise here)."""
        if self.settings.threads is not None:
            import torch

            torch.set_num_threads(self.settings.threads)
        train, held = self._examples()
        resolved = self.resolved_model()
        logger.info(
            "model %s (sha256 %s…), %d training and %d evaluation examples",
            resolved.name,
            resolved.sha256[:12],
            len(train),
            len(held),
        )

    def resolved_model(self) -> ResolvedLike:
        with self._lock:
            if self._resolved is None:
                self._resolved = self._resolve()
            return self._resolved

    def model_sha256(self) -> str:
        return self.resolved_model().sha256

    def _resolve(self) -> ResolvedLike:
        from edge_agent.model.store import resolve_model

        return resolve_model(
            self.settings.model,
            cache_dir=self.settings.model_cache,
            progress=self.settings.progress,
        )

    def _load_base(self, quant: str) -> tuple[Any, Any]:
        from edge_agent.model.store import Quant, load_base

        resolved: Any = self.resolved_model()  # a model_store.ResolvedModel in production
        return load_base(resolved, cast(Quant, quant))

    # ----------------------------------------------------------------------- Workspace protocol

    @property
    def train_examples(self) -> list[Example]:
        return self._examples()[0]

    @property
    def eval_examples(self) -> list[Example]:
        return self._examples()[1]

    @property
    def progress(self) -> bool:
        return self.settings.progress

    @property
    def cache(self) -> dict[str, Any]:
        return self._cache

    @property
    def objects(self) -> ObjectStore:
        with self._lock:
            if self._objects is None:
                root = self.settings.objects_dir
                if root is None:
                    import tempfile

                    root = Path(tempfile.mkdtemp(prefix="edgefed-objects-"))
                self._objects = ObjectStore(root)
            return self._objects

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        local = self.resolved_model()
        if model.sha256 != local.sha256:
            raise ModelMismatch(
                f"the task's base model {model.name} has sha256 {model.sha256}, but this agent "
                f"holds {local.name} with sha256 {local.sha256}"
            )
        with self._lock:
            if quant not in self._bases:
                logger.info("loading base model %s as %s", local.name, quant)
                self._bases[quant] = self._load_base(quant)
            return self._bases[quant]

    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_event(self) -> threading.Event:
        """Set by the daemon on SIGTERM/SIGINT; methods see it through :meth:`should_stop`."""
        return self._stop

    def report_progress(self, fraction: float) -> None:
        self._progress_fraction = min(max(float(fraction), 0.0), 1.0)

    # ------------------------------------------------------------------------ for the daemon

    @property
    def progress_fraction(self) -> float:
        """The running task's last reported progress, for heartbeats."""
        return self._progress_fraction

    def reset_progress(self) -> None:
        self._progress_fraction = 0.0

    def _examples(self) -> tuple[list[Example], list[Example]]:
        with self._lock:
            if self._data is None:
                from edge_agent.training.data import load_jsonl, split_holdout

                s = self.settings
                examples = load_jsonl(s.data)
                if s.eval_data is not None:
                    self._data = (examples, load_jsonl(s.eval_data))
                else:
                    self._data = split_holdout(examples, s.holdout_fraction, HOLDOUT_SEED)
            return self._data
