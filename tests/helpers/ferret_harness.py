"""The round engine with a Ferret server and in-process Ferret agents: real payloads, no sockets.

Task ids are a hash of the run id, round, kind and agent id (``aggregator.engine.rounds.task_id_for``)
and a run's id is fresh per run in deployment: two harnesses with other ``run_id`` values and
the same flags differ in their task ids and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aggregator.engine.engine import RoundEngine, RoundSummary
from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer
from aggregator.ops.config import build_config
from aggregator.privacy.wrap import private_method
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from edge_agent.methods import TaskInput
from edge_agent.methods.ferret.client import FerretClient
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.privacy.secagg_method import SecureClient
from edge_agent.training.data import Example
from protocol.errors import ErrorCode
from protocol.frames import decode, encode
from protocol.messages import BaseModelRef, ErrorReply, Hello, TaskAssign, TaskResult
from protocol.methods import parse_params
from protocol.privacy import method_params
from tests.helpers.engine_harness import MODEL, PROFILE, SHA, Clock, assigns


class FerretWorkspace:
    """The agent Workspace protocol over a resolved (tiny) model and a list of examples."""

    def __init__(self, resolved: ResolvedModel, examples: list[Example]) -> None:
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        self.train_examples = examples
        self.eval_examples = examples[:1]
        self.progress = False
        self._bases: dict[str, tuple[Any, Any]] = {}

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        if quant not in self._bases:
            self._bases[quant] = load_base(self.resolved, quant, device="cpu")  # type: ignore[arg-type]
        return self._bases[quant]

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


class FerretHarness:
    """A Ferret run of ``rounds`` rounds on the round engine, agents answered in-process."""

    def __init__(
        self,
        state_dir: Path,
        model_dir: Path,
        resolved: ResolvedModel,
        data: dict[str, list[Example]],
        *,
        params: dict[str, Any],
        rounds: int = 2,
        seed: int = 0,
        run_id: str = "run-f",
        privacy: dict[str, Any] | None = None,
    ) -> None:
        raw = {
            "server": {"state_dir": str(state_dir), "heartbeat_interval": 1.0, "liveness": 3},
            "security": {"insecure": True},
            "run": {
                "run_id": run_id,
                "method": "ferret",
                "rounds": rounds,
                "min_agents": len(data),
                "eval": False,
                "model_sha256": SHA,
                "round_deadline_s": 600.0,
                "seed": seed,
            },
            "method": params,
            "privacy": privacy or {},
        }
        self.config = build_config(raw)
        self.clock = Clock()
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        self.method = FerretServer(
            self.config.method,
            MethodContext(
                model_dir=model_dir, seed=self.config.run.seed, rounds=self.config.run.rounds
            ),
        )
        self.summaries: list[RoundSummary] = []
        self.engine = RoundEngine(
            self.config,
            private_method(self.method, self.config),
            MODEL,
            ledger=self.ledger,
            store=CheckpointStore(state_dir / "checkpoints"),
            clock=self.clock,
            on_round=self.summaries.append,
        )
        self.engine.start()
        self.workspaces = {a: FerretWorkspace(resolved, ex) for a, ex in data.items()}
        # one client per agent: under secure aggregation it holds the round's keys
        self.clients = {a: SecureClient(FerretClient()) for a in data}
        self.fail: dict[str, str] = {}
        """``fail[agent] = stage``: that agent fails its task at that secure-aggregation stage
        (``mask``: after sharing; ``unmask``: after masking) of round 1, as if it died."""
        self.task_ids: list[str] = []

    def _send(self, agent: str, header: Any, blobs: dict[str, bytes] | None = None) -> list[Any]:
        return self.engine.on_message(agent, decode(encode(header, blobs)), self.clock.now)

    def _answer(self, agent: str, assign: TaskAssign, blobs: dict[str, bytes]) -> None:
        self.task_ids.append(assign.task_id)
        stage = assign.params.get("secagg", {}).get("stage")
        if stage is not None and assign.round == 1 and self.fail.get(agent) == stage:
            reply = ErrorReply(code=ErrorCode.TASK_FAILED, reason="gone", task_id=assign.task_id)
            self._send(agent, reply)
            return
        task = TaskInput(
            assign=assign,
            params=parse_params("ferret", method_params(assign.params)),
            blobs={k: memoryview(v) for k, v in blobs.items()},
            agent_id=agent,
        )
        out = self.clients[agent].run(task, self.workspaces[agent])  # type: ignore[arg-type]
        header = TaskResult(
            run_id=assign.run_id,
            round=assign.round,
            task_id=assign.task_id,
            agent_id=agent,
            method="ferret",
            kind=assign.kind,
            num_examples=out.num_examples,
            metrics=out.metrics,
        )
        self._send(agent, header, out.blobs)

    def run(self) -> dict[str, torch.Tensor]:
        """Every round to the end; the server's global weights (after the last step)."""
        for agent in self.workspaces:
            self._send(agent, Hello(agent_id=agent, versions=[1], profile=PROFILE, models=[SHA]))
        while not self.engine.finished:
            self.clock.now += 0.1
            out = self.engine.tick(self.clock.now)
            tasks = assigns(out)
            blobs = {o.agent_id: dict(o.blobs) for o in out if isinstance(o.header, TaskAssign)}
            for agent, assign in sorted(tasks.items()):
                self._answer(agent, assign, {k: bytes(v) for k, v in blobs[agent].items()})
        self.method.wait_weights()
        return self.method.weights

    def close(self) -> None:
        self.ledger.close()
