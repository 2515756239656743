"""Ferret server half: weighted coefficient means, bit-identical agents, catch-up, checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.methods import Assignment, MethodContext
from aggregator.methods.ferret.server import FerretServer
from aggregator.store.checkpoint import CheckpointStore
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.ferret.client import CACHE_KEY, FerretClient
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example
from protocol import payloads, randomness
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params
from protocol.methods.ferret import math as fm
from protocol.methods.ferret import spec

K = 6
PARAMS: dict[str, Any] = {
    "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32},
    "eval": {"max_len": 32, "batch_size": 2, "max_new_tokens": 2},
    "ferret": {"k": K},
}
DATA = {
    "a": [Example("Capital of France?", "Paris"), Example("Say hello.", "hello hello")],
    "b": [Example("Two plus two?", "four"), Example("Capital of Italy?", "Rome")] * 2,
}


class Agent:
    """A ferret client with its own workspace (the Workspace protocol over the tiny model)."""

    def __init__(self, agent_id: str, resolved: ResolvedModel) -> None:
        self.id = agent_id
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        self.train_examples = DATA[agent_id]
        self.eval_examples = DATA[agent_id][:1]
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

    def run(self, kind: str, round: int, a: Assignment) -> TaskOutput:
        assign = TaskAssign(
            run_id="run-s",
            round=round,
            task_id=f"r{round}-{kind}-{self.id}",
            kind=kind,  # type: ignore[arg-type]
            method="ferret",
            model=BaseModelRef(name="tiny", sha256=self.resolved.sha256),
            quant="fp32",
            params=a.params,
            deadline_s=60.0,
        )
        blobs = {k: memoryview(v) for k, v in a.blobs.items()}
        task = TaskInput(
            assign=assign, params=parse_params("ferret", a.params), blobs=blobs, agent_id=self.id
        )
        return FerretClient().run(task, self)

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.cache[CACHE_KEY].tensors)


def result_of(agent: str, round: int, out: TaskOutput) -> TaskResult:
    return TaskResult(
        run_id="run-s",
        round=round,
        task_id=f"r{round}-train-{agent}",
        agent_id=agent,
        method="ferret",
        num_examples=out.num_examples,
        metrics=out.metrics,
    )


def views(blobs: Mapping[str, bytes]) -> dict[str, memoryview]:
    return {k: memoryview(v) for k, v in blobs.items()}


def train_round(server: FerretServer, agents: list[Agent], round: int) -> dict[str, float]:
    server.begin_round(round)
    for agent in agents:
        out = agent.run("train", round, server.assign(round, agent.id, "train"))
        server.add(server.validate(round, result_of(agent.id, round, out), views(out.blobs)))
    return server.finish_round(round)


def assert_same(server: FerretServer, agent: Agent) -> None:
    server.wait_weights()
    mine = agent.weights()
    assert set(mine) == set(server.weights)
    for name, tensor in server.weights.items():
        assert torch.equal(mine[name], tensor), name


@pytest.fixture
def server(tiny_model_dir: Path) -> FerretServer:
    return FerretServer(PARAMS, MethodContext(model_dir=tiny_model_dir))


def seedcoef(round: int, triples: list[tuple[int, int, float]], *, k: int = K, n: int = 0) -> bytes:
    g, s, v = zip(*triples, strict=True) if triples else ((), (), ())
    return payloads.encode_seedcoef(
        torch.tensor(g, dtype=torch.int32),
        torch.tensor(s, dtype=torch.int32),
        torch.tensor(v, dtype=torch.float32),
        base_seed=fm.pool_base_seed(0),
        k=k,
        n_groups=n,
        method="ferret",
        round=round,
    )


def test_agents_rebuild_the_servers_model_bit_for_bit(
    server: FerretServer, tiny_resolved: ResolvedModel
) -> None:
    a, b = Agent("a", tiny_resolved), Agent("b", tiny_resolved)
    base = {n: t.clone() for n, t in server.weights.items()}
    metrics = train_round(server, [a, b], 1)
    assert metrics["k"] == K and metrics["examples"] == 6.0
    assert 2 * len(server.layout.groups) <= metrics["triples"] <= K * len(server.layout.groups)
    step = server.assign(1, "a", "eval")
    assert set(step.blobs) == {"step-000001"}
    # the broadcast is the coefficients only: 12 bytes per aggregated triple plus the header
    header = payloads.decode(step.blobs["step-000001"]).header_nbytes
    assert len(step.blobs["step-000001"]) == 12 * metrics["triples"] + header
    assert metrics["step_bytes"] == len(step.blobs["step-000001"])
    a.run("eval", 1, step)
    assert_same(server, a)
    assert any(not torch.equal(base[n], t) for n, t in server.weights.items())
    # round 2 without b (not selected), no eval: b catches up in round 3 from both steps
    train_round(server, [a], 2)
    server.begin_round(3)
    sent = server.assign(3, "b", "train")
    assert set(sent.blobs) == {"step-000001", "step-000002"}
    assert server.assign(3, "b", "train").blobs is sent.blobs  # a re-sent task: same blobs
    assert server.assign(3, "a", "train").blobs.keys() == {"step-000002"}
    out = b.run("train", 3, sent)
    assert out.metrics["held_round"] == 2.0
    server.wait_weights()
    assert_same(server, b)


@pytest.mark.parametrize("anneal", ["linear", "none"])
def test_the_schedule_sets_each_rounds_step_from_the_runs_one_pool(
    anneal: str, tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    params = PARAMS | {"ferret": {"k": K, "anneal": anneal, "server_lr": 3.0}}
    server = FerretServer(params, MethodContext(model_dir=tiny_model_dir, rounds=3))
    a, b = Agent("a", tiny_resolved), Agent("b", tiny_resolved)
    lrs = [train_round(server, [a], r)["server_lr"] for r in (1, 2)]
    assert lrs == ([3.0, 2.0] if anneal == "linear" else [3.0, 3.0])
    server.begin_round(3)
    sent = server.assign(3, "b", "train")
    seeds = [payloads.decode(sent.blobs[spec.step_blob(r)]).base_seed for r in (1, 2)]
    assert seeds == [fm.pool_base_seed(0)] * 2  # one pool for the run
    b.run("train", 3, sent)  # b rebuilds both steps from it
    assert_same(server, b)


def test_far_behind_agents_get_the_dense_model_once(
    tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    params = PARAMS | {"ferret": {"k": K, "max_catchup": 1}}
    server = FerretServer(params, MethodContext(model_dir=tiny_model_dir))
    a, b = Agent("a", tiny_resolved), Agent("b", tiny_resolved)
    train_round(server, [a], 1)
    train_round(server, [a], 2)
    sent = server.assign(2, "b", "eval")
    assert set(sent.blobs) == {"global"}
    dense = payloads.decode(sent.blobs["global"])
    assert dense.kind == payloads.PayloadKind.DENSE and dense.round == 2
    b.run("eval", 2, sent)
    assert_same(server, b)
    assert server.assign(3, "b", "train").blobs == {}  # b holds round 2 now


def test_coefficients_are_averaged_with_example_weights(server: FerretServer) -> None:
    n = len(server.layout.groups)
    one = seedcoef(1, [(0, 1, 2.0), (1, 0, 1.0)], n=n)
    three = seedcoef(1, [(0, 1, -2.0), (0, 2, 4.0)], n=n)
    for agent, blob, examples in (("x", one, 1), ("y", three, 3)):
        res = TaskResult(
            run_id="r", round=1, task_id=f"t-{agent}", agent_id=agent, method="ferret",
            num_examples=examples, metrics={"held_round": 0.0},
        )  # fmt: skip
        server.add(server.validate(1, res, {"update": memoryview(blob)}))
    metrics = server.finish_round(1)
    group, seed, value = server.history[1]
    assert group.tolist() == [0, 0, 1] and seed.tolist() == [1, 2, 0]
    assert value.tolist() == [-1.0, 3.0, 0.25]  # (2 - 6) / 4, 12 / 4, 1 / 4
    assert metrics["triples"] == 3.0 and metrics["clipped"] == 0.0


@pytest.mark.parametrize(
    ("blobs", "metrics", "examples", "match"),
    [
        ({"update": "pool"}, {}, 1, "seed indices outside"),
        ({"update": "k"}, {}, 1, "edgefed.k"),
        ({"update": "other-round"}, {}, 1, "base_seed"),
        ({"update": "ok", "extra": "ok"}, {}, 1, "expected one blob"),
        ({"update": "ok"}, {"held_round": 0.0}, 1, "trained from global round 0"),
        ({"update": "ok"}, {"held_round": 0.0, "out_of_sync": 1.0}, 1, "out-of-sync"),
    ],
)
def test_updates_outside_the_rounds_pool_are_rejected(
    server: FerretServer,
    blobs: dict[str, str],
    metrics: dict[str, float],
    examples: int,
    match: str,
) -> None:
    n = len(server.layout.groups)
    made = {
        "ok": seedcoef(2, [(0, 1, 0.5)], n=n),
        # a hostile agent: seed index K (outside 0..K-1) in a payload that claims k = K
        "pool": seedcoef(2, [(0, K, 0.5)], k=K + 1, n=n).replace(
            f'"edgefed.k":"{K + 1}"'.encode(), f'"edgefed.k":"{K}"'.encode()
        ),
        "k": seedcoef(2, [(0, 1, 0.5)], k=K + 1, n=n),
        "other-round": payloads.encode_seedcoef(
            torch.zeros(1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            torch.ones(1),
            base_seed=randomness.derive_key(0, 1),
            k=K,
            n_groups=n,
            method="ferret",
            round=2,
        ),
    }
    res = TaskResult(
        run_id="r", round=2, task_id="t", agent_id="x", method="ferret",
        num_examples=examples, metrics=metrics,
    )  # fmt: skip
    with pytest.raises(UpdateRejected, match=match):
        server.validate(2, res, {k: memoryview(made[v]) for k, v in blobs.items()})
    assert server.validate(
        2, res.model_copy(update={"metrics": {}}), {"update": memoryview(made["ok"])}
    )


def test_an_out_of_sync_agent_is_resent_from_where_it_is(server: FerretServer) -> None:
    for r in (1, 2):
        server.begin_round(r)
        server.finish_round(r)
    server.begin_round(3)
    assert server.assign(3, "x", "train").blobs.keys() == {"step-000001", "step-000002"}
    res = TaskResult(
        run_id="r", round=3, task_id="t", agent_id="x", method="ferret", num_examples=0,
        metrics={"held_round": 1.0, "out_of_sync": 1.0},
    )  # fmt: skip
    server.add(
        server.validate(
            3, res, {"update": memoryview(seedcoef(3, [], n=len(server.layout.groups)))}
        )
    )
    assert server.finish_round(3)["triples"] == 0.0
    assert server.assign(4, "x", "train").blobs.keys() == {"step-000002", "step-000003"}


def test_checkpoint_restores_the_same_weights(
    server: FerretServer, tiny_model_dir: Path, tiny_resolved: ResolvedModel, tmp_path: Path
) -> None:
    agents = [Agent("a", tiny_resolved), Agent("b", tiny_resolved)]
    train_round(server, agents, 1)
    train_round(server, agents, 2)
    store = CheckpointStore(tmp_path / "ckpt")
    tensors, meta = server.state()
    assert tensors["history.value"].numel() == len(server.history[1][0]) + len(server.history[2][0])
    store.save(2, tensors, method="ferret", meta=meta)
    loaded, manifest, _ = store.load(2)
    again = FerretServer(PARAMS, MethodContext(model_dir=tiny_model_dir))
    again.restore(loaded, manifest.meta)
    again.wait_weights()
    server.wait_weights()
    assert again.round == again.applied == 2
    for name, tensor in server.weights.items():
        assert torch.equal(again.weights[name], tensor)
    other = FerretServer(PARAMS, MethodContext(model_dir=tiny_model_dir))
    with pytest.raises(StateError, match="layout"):
        other.restore(loaded, {**manifest.meta, "layout": "0" * 64})


def test_export_writes_a_loadable_model_directory(
    server: FerretServer, tiny_resolved: ResolvedModel, tmp_path: Path
) -> None:
    train_round(server, [Agent("a", tiny_resolved)], 1)
    written = server.export(tmp_path / "out", base_model_name="tiny")
    out = written["model"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "ferret.json"} <= {
        p.name for p in out.iterdir()
    }
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(server.weights)
    assert all(torch.equal(saved[n], t) for n, t in server.weights.items())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(dict(model.named_parameters())[q].data, server.weights[q])


def test_needs_the_base_model_weights() -> None:
    with pytest.raises(ConfigError, match="run.model_dir"):
        FerretServer(PARAMS, MethodContext())


def test_seed_and_rounds_default_to_the_runs(tiny_model_dir: Path) -> None:
    linear = PARAMS | {"ferret": {"k": K, "anneal": "linear"}}
    s = FerretServer(linear, MethodContext(model_dir=tiny_model_dir, seed=7, rounds=5))
    assert (s.p.seed, s.p.rounds) == (7, 5)
    assert s.assign(1, "a", "train").params["ferret"]["rounds"] == 5
    fixed = PARAMS | {"ferret": {"k": K, "seed": 2, "rounds": 9, "anneal": "linear"}}
    s = FerretServer(fixed, MethodContext(model_dir=tiny_model_dir, seed=7, rounds=5))
    assert (s.p.seed, s.p.rounds) == (2, 9)
    with pytest.raises(ConfigError, match="ferret.rounds"):
        FerretServer(linear, MethodContext(model_dir=tiny_model_dir))


def _ferret_round(server: FerretServer, updates: list[tuple[str, bytes, int]]) -> list[float]:
    for agent, blob, examples in updates:
        res = TaskResult(
            run_id="r", round=1, task_id=f"t-{agent}", agent_id=agent, method="ferret",
            num_examples=examples, metrics={"held_round": 0.0},
        )  # fmt: skip
        server.add(server.validate(1, res, {"update": memoryview(blob)}))
    server.finish_round(1)
    group, seed, value = server.history[1]
    return [float(v) for g, s, v in zip(group, seed, value, strict=True) if (g, s) == (0, 1)]


def test_a_huge_coefficient_is_clipped_on_receipt(server: FerretServer) -> None:
    # issue 24 (7): Ferret accepted coefficients of 1e30 (and 10^7 examples gave them the mean)
    n = len(server.layout.groups)
    honest = [(a, seedcoef(1, [(0, 1, 1.0)], n=n), 10) for a in ("x", "y", "z")]
    evil = ("evil", seedcoef(1, [(0, 1, 1e30)], n=n), 10**7)
    (value,) = _ferret_round(server, [*honest, evil])
    bound = server.p.clip_norm
    assert value <= bound  # at most the per-term bound, whatever the claimed weight


def test_ferret_median_ignores_one_outlier(tiny_model_dir: Path) -> None:
    params = {**PARAMS, "aggregation": {"rule": "median"}}
    server = FerretServer(params, MethodContext(model_dir=tiny_model_dir))
    n = len(server.layout.groups)
    honest = [(a, seedcoef(1, [(0, 1, v)], n=n), 10) for a, v in (("x", 1.0), ("y", 1.5))]
    evil = ("evil", seedcoef(1, [(0, 1, 9.0)], n=n), 10**6)
    (value,) = _ferret_round(server, [*honest, ("z", seedcoef(1, [(0, 1, 2.0)], n=n), 10), evil])
    assert value == pytest.approx(1.75)  # the median of 1, 1.5, 2, 9
    with pytest.raises(ConfigError, match="does not apply to ferret"):
        FerretServer(
            {**PARAMS, "aggregation": {"clip_norm": 5.0}}, MethodContext(model_dir=tiny_model_dir)
        )
