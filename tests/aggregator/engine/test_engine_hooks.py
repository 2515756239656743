"""The engine's optional method hooks: score phase, plan, per-agent quant, on_hello, details."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from engine_harness import PROFILE, SHA, Harness, assigns, lora_state

from aggregator.errors import UpdateRejected
from aggregator.methods import AgentView, Assignment
from aggregator.methods.fedit.server import FeditServer
from aggregator.store.updatelog import LOG_NAME, scan
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply, Hello, TaskResult


class HookedFedit(FeditServer):
    """FedIT plus every optional hook, recording what the engine told it."""

    def __init__(self, params: Mapping[str, object]) -> None:
        super().__init__(params)
        self.scores: dict[str, float] = {}
        self.plans: list[tuple[int, str, list[str]]] = []
        self.hellos: list[AgentView] = []
        self.scored_round: int | None = None

    def on_hello(self, view: AgentView) -> None:
        self.hellos.append(view)

    def wants_score(self, round: int) -> bool:
        return round == 1 and self.scored_round is None

    def add_score(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> None:
        if result.metrics.get("score", -1.0) < 0:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "negative score")
        self.scores[result.agent_id] = result.metrics["score"]

    def finish_score(self, round: int) -> dict[str, float]:
        self.scored_round = round
        return {"scored": float(len(self.scores))}

    def plan(self, round: int, kind: str, views: Mapping[str, AgentView]) -> None:
        self.plans.append((round, kind, sorted(views)))

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        base = super().assign(round, agent_id, kind)
        quant = "int8" if agent_id == "b" and kind == "train" else None
        return Assignment(base.params, base.blobs, quant=quant)

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        return {a: {"score": f"{s:g}"} for a, s in self.scores.items()}


@pytest.fixture
def hooked(tmp_path: Path) -> Harness:
    h = Harness(tmp_path, rounds=1)
    method = HookedFedit(h.config.method)
    h.method = method
    h.engine.method = method
    return h


def score_result(h: Harness, assign: object, agent: str, score: float) -> list[object]:
    from protocol.messages import TaskAssign

    assert isinstance(assign, TaskAssign)
    header = TaskResult(
        run_id=assign.run_id,
        round=assign.round,
        task_id=assign.task_id,
        agent_id=agent,
        method="fedit",
        kind="score",
        num_examples=3,
        metrics={"score": score},
    )
    return list(h.send(agent, header))


def test_score_phase_runs_before_training_and_hooks_see_everything(hooked: Harness) -> None:
    h = hooked
    method = h.engine.method
    assert isinstance(method, HookedFedit)
    h.send("a", Hello(agent_id="a", versions=[1], profile=PROFILE, models=[SHA], holds=["ab" * 32]))
    h.hello("b")
    assert [v.agent_id for v in method.hellos] == ["a", "b"]
    assert method.hellos[0].holds == frozenset({"ab" * 32})

    scoring = assigns(h.tick())
    assert sorted(scoring) == ["a", "b"]
    assert {t.kind for t in scoring.values()} == {"score"}
    assert method.plans == [(1, "score", ["a", "b"])]

    # a refused score is answered with an error and the phase still closes
    out = score_result(h, scoring["a"], "a", -1.0)
    assert isinstance(out[0].header, ErrorReply)  # type: ignore[attr-defined]
    assert score_result(h, scoring["b"], "b", 2.5)
    train = assigns(h.tick())
    assert {t.kind for t in train.values()} == {"train"}
    assert train["b"].quant == "int8" and train["a"].quant == h.config.run.quant
    assert method.plans[-1] == (1, "train", ["a", "b"])
    assert method.scores == {"b": 2.5}

    for agent, value in (("a", 1.0), ("b", 3.0)):
        h.result(train[agent], agent, 10, lora_state(value))
    h.tick()
    (summary,) = h.summaries
    assert summary.method["scored"] == 1.0
    assert summary.per_agent["b"]["score"] == "2.5"
    assert int(summary.per_agent["a"]["up"]) > 0 and int(summary.per_agent["a"]["down"]) > 0
    name = next(iter(method.global_state))
    expected = (lora_state(1.0)[name] + lora_state(3.0)[name]) / 2
    torch.testing.assert_close(method.global_state[name], expected)


def test_a_rounds_stored_updates_go_once_it_commits(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1)
    for a in ("a", "b"):
        h.hello(a)
    tasks = assigns(h.tick())
    h.result(tasks["a"], "a", 5, lora_state(1.0))
    stored = tmp_path / "updates" / "run-t" / "round-000001"
    (row,) = h.ledger.updates("run-t", 1)  # durable before the Ack: in the round's log
    assert row.blob_path == str(stored / LOG_NAME)
    records, end = scan(stored / LOG_NAME)
    (record,) = records  # one record: the row and its payload
    assert (record.offset, record.length) == (row.blob_offset, row.blob_length)
    assert record.row["task_id"] == row.task_id and end == (stored / LOG_NAME).stat().st_size
    h.result(tasks["b"], "b", 5, lora_state(2.0))
    h.tick()
    assert h.summaries and not stored.exists()
    h.close()


def test_large_results_travel_a_window_at_a_time(tmp_path: Path) -> None:
    from protocol.messages import Ack, Grant, Heartbeat, Welcome

    h = Harness(tmp_path, rounds=1, min_agents=4)
    server = h.config.server.model_copy(update={"upload_window": 2})
    h.engine.config = h.config = h.config.model_copy(update={"server": server})
    welcomes = [h.hello(a)[0].header for a in "abcd"]
    assert all(isinstance(w, Welcome) and w.grant_above == 1 << 20 for w in welcomes)
    tasks = assigns(h.tick())
    for a in "abcd":
        h.send(a, Heartbeat(ready=[tasks[a].task_id]))
    grants = [o for o in h.tick() if isinstance(o.header, Grant)]
    assert [(g.agent_id, g.header.task_id) for g in grants] == [  # type: ignore[attr-defined]
        ("a", tasks["a"].task_id),
        ("b", tasks["b"].task_id),
    ]
    assert not [o for o in h.tick() if isinstance(o.header, Grant)]  # the window is full
    h.result(tasks["a"], "a", 5, lora_state(1.0))  # frees one slot
    assert [o.agent_id for o in h.tick() if isinstance(o.header, Grant)] == ["c"]
    # an agent re-announcing a result already durable is acked, not granted
    out = h.send("a", Heartbeat(ready=[tasks["a"].task_id]))
    assert [type(o.header) for o in out] == [Ack]
    # a granted upload that never comes frees its slot after grant_timeout_s
    h.clock.now += h.config.server.grant_timeout_s + 1
    for a in "abcd":
        h.send(a, Heartbeat())  # keep them live
    assert [o.agent_id for o in h.tick() if isinstance(o.header, Grant)] == ["d"]
    h.close()


def test_the_evaluation_phase_bytes_are_in_the_round_summary(tmp_path: Path) -> None:
    from protocol.messages import TaskResult

    h = Harness(tmp_path, rounds=1, eval=True, eval_initial=False)
    for a in ("a", "b"):
        h.hello(a)
    tasks = assigns(h.tick())
    for a, v in (("a", 1.0), ("b", 2.0)):
        h.result(tasks[a], a, 5, lora_state(v))
    evals = assigns(h.tick())
    assert {t.kind for t in evals.values()} == {"eval"}
    for a, t in evals.items():
        res = TaskResult(run_id=t.run_id, round=1, task_id=t.task_id, agent_id=a, method="fedit",
                         kind="eval", num_examples=4, metrics={"eval_loss": 1.5, "eval_em": 0.5})  # fmt: skip
        h.send(a, res)
    h.tick()
    (summary,) = h.summaries
    metrics = summary.as_metrics()
    # the eval tasks carried the global adapter down: about as big as a train task's global
    assert metrics["eval_bytes_down_per_agent"] > 0.9 * metrics["bytes_up_per_agent"]
    assert 0 < metrics["eval_bytes_up_per_agent"] < 2000 and summary.eval_loss == 1.5
    h.close()
