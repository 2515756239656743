"""Full-parameter FedAvg in-process: real clients on the tiny model, the server's mean, payloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aggregator.errors import ConfigError, UpdateRejected
from aggregator.methods import Assignment, MethodContext
from aggregator.methods.fedavg.server import FedAvgServer
from edge_agent.errors import TaskError
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.fedavg.client import CACHE_KEY, FedAvgClient
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example
from protocol import payloads
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params

PARAMS: dict[str, Any] = {
    "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32},
    "eval": {"max_len": 32, "batch_size": 2, "max_new_tokens": 2},
}
DATA = {
    "a": [Example("Capital of France?", "Paris"), Example("Say hello.", "hello hello")],
    "b": [Example("Two plus two?", "four"), Example("Capital of Italy?", "Rome")] * 3,
}


class Agent:
    """A fedavg client with its own workspace (the Workspace protocol over the tiny model)."""

    def __init__(self, agent_id: str, resolved: ResolvedModel) -> None:
        self.id = agent_id
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        self.train_examples = DATA[agent_id]
        self.eval_examples = DATA[agent_id][:1]
        self.progress = False
        self._bases: dict[str, tuple[Any, Any]] = {}
        self.taken = 0  # bases handed over (each a fresh load)

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        if quant not in self._bases:
            self._bases[quant] = load_base(self.resolved, quant, device="cpu")  # type: ignore[arg-type]
        return self._bases[quant]

    def take_base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        self.taken += 1
        pair = self.base(model, quant)
        del self._bases[quant]
        return pair

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass

    def run(self, kind: str, round: int, a: Assignment) -> TaskOutput:
        assign = TaskAssign(
            run_id="run-f", round=round, task_id=f"r{round}-{kind}-{self.id}", kind=kind,  # type: ignore[arg-type]
            method="fedavg", model=BaseModelRef(name="tiny", sha256=self.resolved.sha256),
            quant="nf4", params=a.params, deadline_s=60.0,
        )  # fmt: skip
        blobs = {k: memoryview(v) for k, v in a.blobs.items()}
        task = TaskInput(assign=assign, params=parse_params("fedavg", a.params), blobs=blobs)
        return FedAvgClient().run(task, self)


def result_of(agent: str, round: int, out: TaskOutput) -> TaskResult:
    return TaskResult(
        run_id="run-f", round=round, task_id=f"r{round}-train-{agent}", agent_id=agent,
        method="fedavg", num_examples=out.num_examples, metrics=out.metrics,
    )  # fmt: skip


def views(blobs: dict[str, bytes]) -> dict[str, memoryview]:
    return {k: memoryview(v) for k, v in blobs.items()}


@pytest.fixture
def server(tiny_model_dir: Path) -> FedAvgServer:
    return FedAvgServer(PARAMS, MethodContext(model_dir=tiny_model_dir))


def _states(outs: dict[str, TaskOutput]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        a: payloads.decode(memoryview(o.blobs["update"])).tensors for a, o in outs.items()
    }  # fmt: skip


def test_the_global_is_the_example_weighted_mean_of_the_agents_states(
    server: FedAvgServer, tiny_resolved: ResolvedModel, tiny_model_dir: Path
) -> None:
    agents = [Agent("a", tiny_resolved), Agent("b", tiny_resolved)]
    base = {n: t.clone() for n, t in server.global_state.items()}
    assert server.assign(1, "a", "train").blobs == {}  # round 1 starts from the base
    for round in (1, 2):
        server.begin_round(round)
        outs = {
            ag.id: ag.run("train", round, server.assign(round, ag.id, "train")) for ag in agents
        }
        for ag in agents:
            server.add(
                server.validate(
                    round, result_of(ag.id, round, outs[ag.id]), views(outs[ag.id].blobs)
                )
            )
        states = _states(outs)
        before = {n: t.clone() for n, t in server.global_state.items()}
        metrics = server.finish_round(round)
        assert metrics["examples"] == 8.0  # a: 2 examples, b: 6
        for name, t in server.global_state.items():
            expected = (2 * states["a"][name].double() + 6 * states["b"][name].double()) / 8
            assert torch.allclose(t.double(), expected, atol=1e-6), name
        # every weight trains: the agents moved away from the global they started from
        moved = [n for n in before if not torch.equal(states["a"][n], before[n])]
        assert len(moved) == len(before)
        # the agent's copy is trained; the next task brings the new global
        assert agents[0].cache[CACHE_KEY].round == -1
    # the eval task carries the global whole, and the agent holds exactly it afterwards
    a = server.assign(2, "a", "eval")
    assert set(a.blobs) == {"global"}
    assert len(a.blobs["global"]) >= server.payload_bytes
    agents[0].run("eval", 2, a)
    held = agents[0].cache[CACHE_KEY]
    assert held.round == 2
    assert all(torch.equal(held.tensors[n], server.global_state[n]) for n in server.global_state)
    # the agent trains the base it took over (no copy), and round 0's evaluation reads the
    # base again into the trained model
    assert agents[0].taken == 1 and not agents[0]._bases
    agents[0].run("eval", 0, server.assign(0, "a", "eval"))
    assert agents[0].cache[CACHE_KEY] is held and held.round == 0
    assert all(torch.equal(held.tensors[n], base[n]) for n in base)
    assert agents[0].taken == 2 and not agents[0]._bases  # the fresh load is not kept
    # the export is a loadable full model
    out = server.export(tiny_model_dir.parent / "fedavg-export", base_model_name="tiny")
    saved = load_file(str(out["weights"]))
    assert all(torch.equal(saved[n], server.global_state[n]) for n in server.global_state)
    assert (out["model"] / "config.json").is_file()


def test_payloads_are_checked_against_the_global_model(server: FedAvgServer) -> None:
    good = {n: t.clone() for n, t in server.global_state.items()}
    result = TaskResult(run_id="r", round=1, task_id="t", agent_id="a", method="fedavg",
                        num_examples=3, metrics={})  # fmt: skip

    def blob(state: dict[str, torch.Tensor], round: int = 1) -> dict[str, memoryview]:
        return {"update": memoryview(payloads.encode_dense(state, method="fedavg", round=round))}

    assert server.validate(1, result, blob(good)).num_examples == 3
    name = next(iter(good))
    missing = {k: v for k, v in good.items() if k != name}
    wrong_shape = good | {name: torch.zeros(3, 3)}
    wrong_dtype = good | {name: good[name].to(torch.float16)}
    for bad in (missing, wrong_shape, wrong_dtype):
        with pytest.raises(UpdateRejected):
            server.validate(1, result, blob(bad))
    with pytest.raises(UpdateRejected):
        server.validate(1, result, blob(good, round=2))  # another round's payload
    with pytest.raises(UpdateRejected, match="example count"):
        server.validate(1, result.model_copy(update={"num_examples": 0}), blob(good))


def test_a_message_limit_too_small_for_the_model_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"fedavg sends the whole model.*max_message_bytes"):
        FedAvgServer(PARAMS, MethodContext(model_dir=tiny_model_dir, max_message_bytes=1 << 16))


def test_an_agent_without_the_global_refuses_to_train_from_a_guess(
    server: FedAvgServer, tiny_resolved: ResolvedModel
) -> None:
    agent = Agent("a", tiny_resolved)
    agent.run("eval", 0, server.assign(0, "a", "eval"))  # holds the base (round 0)
    with pytest.raises(TaskError, match="does not hold round 3's"):
        agent.run("train", 4, Assignment(params=server.assign(1, "a", "train").params))


def test_one_updates_weight_is_capped_at_max_weight(server: FedAvgServer) -> None:
    """A liar claiming 10 million examples (accepted: max_examples) counts for max_weight
    (10,000) in the mean, as in every other method, not for its claim."""
    base = {n: t.clone() for n, t in server.global_state.items()}
    server.begin_round(1)
    for agent, n, step in (("honest", 32, 0.01), ("liar", 10_000_000, 0.03)):
        state = {k: v + step for k, v in base.items()}
        blob = payloads.encode_dense(state, method="fedavg", round=1)
        res = TaskResult(run_id="r", round=1, task_id=f"t-{agent}", agent_id=agent,
                         method="fedavg", num_examples=n)  # fmt: skip
        server.add(server.validate(1, res, {"update": memoryview(blob)}))
    server.finish_round(1)
    name = next(iter(base))
    moved = (server.global_state[name] - base[name]).double().mean().item()
    cap = server.params.aggregation.max_weight
    assert cap == 10_000
    assert moved == pytest.approx((32 * 0.01 + cap * 0.03) / (32 + cap), rel=1e-3)
