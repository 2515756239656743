"""Tiered aggregation: a regional tier's mean, weighted by its total, gives the flat result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_harness import MODEL, PROFILE, SHA, Clock, Harness, assigns, lora_state

from aggregator.engine.engine import RoundEngine
from aggregator.errors import ConfigError
from aggregator.methods import MethodContext, ServerMethod
from aggregator.methods.fedit.server import FeditServer
from aggregator.methods.ferret.server import FerretServer
from aggregator.methods.slora.server import SloraServer
from aggregator.ops.config import build_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from aggregator.tier.relay import RelayMethod, weighted_metrics
from protocol import payloads
from protocol.frames import decode, encode
from protocol.messages import Hello, TaskAssign, TaskResult
from protocol.methods.ferret import math as fm

REGIONS = {"east": [("a", 3), ("b", 5)], "west": [("c", 2), ("d", 7), ("e", 1)]}


def result(method: str, round: int, agent: str, n: int, **metrics: float) -> TaskResult:
    return TaskResult(run_id="r", round=round, task_id=f"r{round}-{agent}", agent_id=agent,
                      method=method, num_examples=n, metrics={"train_loss": 1.0, **metrics})  # fmt: skip


def flat_and_tiered(
    make: Callable[[], ServerMethod],
    blob: Callable[[ServerMethod, int, str], bytes],
    rounds: int,
    **metrics: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the same agents' updates flat and through one relay per region; both global states."""
    flat, upstream = make(), make()
    relays = {r: RelayMethod(flat.name) for r in REGIONS}
    for rnd in range(1, rounds + 1):
        flat.begin_round(rnd)
        upstream.begin_round(rnd)
        for region, agents in REGIONS.items():
            relay = relays[region]
            relay.begin_round(rnd)
            for agent, n in agents:
                data = blob(flat, rnd, agent)
                res = result(flat.name, rnd, agent, n, **metrics)
                flat.add(flat.validate(rnd, res, {"update": memoryview(data)}))
                relay.add(relay.validate(rnd, res, {"update": memoryview(data)}))
            relay.finish_round(rnd)
            answer = relay.answers.get("train", rnd)
            assert answer is not None
            data, total = answer[0]["update"], answer[1]
            assert total == sum(n for _, n in agents)
            res = result(flat.name, rnd, region, total, **metrics)
            upstream.add(upstream.validate(rnd, res, {"update": memoryview(data)}))
        flat.finish_round(rnd)
        upstream.finish_round(rnd)
    return flat.state()[0], upstream.state()[0]


def assert_same(flat: dict[str, torch.Tensor], tiered: dict[str, torch.Tensor]) -> None:
    assert flat.keys() == tiered.keys() and flat
    for name, value in flat.items():
        torch.testing.assert_close(tiered[name], value, rtol=1e-6, atol=1e-7)


def agent_value(agent: str, rnd: int) -> float:
    return (ord(agent) - 96) * 0.37 + rnd * 0.11


def test_fedit_two_tier_equals_flat() -> None:
    params = {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}}

    def blob(s: ServerMethod, rnd: int, agent: str) -> bytes:
        return payloads.encode_lora(lora_state(agent_value(agent, rnd)), method="fedit", round=rnd)

    assert_same(*flat_and_tiered(lambda: FeditServer(params), blob, rounds=2))


def test_slora_stage1_two_tier_equals_flat(tiny_model_dir: Path) -> None:
    params = {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
              "sparse": {"stage1_rounds": 3, "density": 0.05}}  # fmt: skip

    def blob(s: Any, rnd: int, agent: str) -> bytes:
        values = {
            n: torch.linspace(-1, 1, c) * agent_value(agent, rnd)
            for n, c in s.mask_counts().items()
        }
        return payloads.encode_masked(values, s.shapes, seed=s.mask_seed, density=s.density,
                                      method="slora", round=rnd)  # fmt: skip

    make = lambda: SloraServer(params, MethodContext(model_dir=tiny_model_dir, seed=0))  # noqa: E731
    assert_same(*flat_and_tiered(make, blob, rounds=2))


def test_slora_through_the_switch_two_tier_equals_flat(tiny_model_dir: Path) -> None:
    """Two stage-1 rounds, the SVD switch, two stage-2 rounds: the regions relay masked values,
    then LoRA updates of the switched adapter's shapes, and the global stays the flat one."""
    params = {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
              "sparse": {"stage1_rounds": 2, "density": 0.05}}  # fmt: skip
    stages: dict[int, int] = {}
    switched: dict[str, torch.Tensor] = {}

    def blob(s: Any, rnd: int, agent: str) -> bytes:
        stages[rnd] = s.stage
        if s.stage == 1:
            values = {
                n: torch.linspace(-1, 1, c) * agent_value(agent, rnd)
                for n, c in s.mask_counts().items()
            }
            return payloads.encode_masked(values, s.shapes, seed=s.mask_seed, density=s.density,
                                          method="slora", round=rnd)  # fmt: skip
        if not switched:
            switched.update({n: t.clone() for n, t in s.lora.items()})
        # an agent's stage-2 update: the global adapter moved by an agent- and round-own step
        state = {n: t + 0.01 * agent_value(agent, rnd) for n, t in s.lora.items()}
        return payloads.encode_lora(state, method="slora", round=rnd)

    make = lambda: SloraServer(params, MethodContext(model_dir=tiny_model_dir, seed=0))  # noqa: E731
    flat, tiered = flat_and_tiered(make, blob, rounds=4)
    assert stages == {1: 1, 2: 1, 3: 2, 4: 2}
    assert switched and flat.keys() == switched.keys()
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in flat)
    assert any(not torch.equal(flat[n], switched[n]) for n in flat)  # stage 2 moved the adapter
    assert_same(flat, tiered)


def test_ferret_two_tier_equals_flat(tiny_model_dir: Path) -> None:
    params = {"ferret": {"k": 6}}

    def blob(s: Any, rnd: int, agent: str) -> bytes:
        n = len(s.layout.groups)
        g = torch.Generator().manual_seed(ord(agent) * 100 + rnd)
        picks = sorted(
            {(int(x) % n, int(y) % 6) for x, y in torch.randint(0, 10**6, (9, 2), generator=g)}
        )
        group = torch.tensor([p[0] for p in picks], dtype=torch.int32)
        seed = torch.tensor([p[1] for p in picks], dtype=torch.int32)
        value = torch.randn(len(picks), generator=g)
        return payloads.encode_seedcoef(
            group, seed, value, base_seed=fm.pool_base_seed(0), k=6, n_groups=n,
            method="ferret", round=rnd,
        )  # fmt: skip

    servers: list[FerretServer] = []

    def make() -> FerretServer:
        servers.append(FerretServer(params, MethodContext(model_dir=tiny_model_dir)))
        return servers[-1]

    # held_round: every agent trained from the previous global round
    flat, tiered = {}, {}
    f, t = flat_and_tiered(make, blob, rounds=1, held_round=0.0)
    flat.update(f)
    tiered.update(t)
    assert_same(flat, tiered)
    for s in servers:
        s.wait_weights()
    torch.testing.assert_close(servers[1].weights, servers[0].weights, rtol=0, atol=1e-6)


def test_region_metrics_are_example_weighted() -> None:
    results = [result("fedit", 1, "a", 1, eval_loss=2.0), result("fedit", 1, "b", 3, eval_loss=1.0)]
    total, metrics = weighted_metrics(results)
    assert total == 4 and metrics["eval_loss"] == pytest.approx(1.25)


# --- the same through real engines: an upstream engine and two driven regional engines --------


class Region:
    def __init__(self, state_dir: Path, name: str) -> None:
        raw = {
            "server": {"state_dir": str(state_dir), "heartbeat_interval": 1.0, "liveness": 3},
            "security": {"insecure": True},
            "run": {"run_id": f"region-{name}", "rounds": 100_000, "min_agents": len(REGIONS[name]),
                    "model_sha256": SHA, "round_deadline_s": 60.0},
        }  # fmt: skip
        self.config = build_config(raw)
        self.clock = Clock()
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        self.relay = RelayMethod("fedit")
        self.closed: list[tuple[str, int, list[TaskResult]]] = []
        self.engine = RoundEngine(
            self.config, self.relay, MODEL, ledger=self.ledger,
            store=CheckpointStore(state_dir / "checkpoints"), clock=self.clock, driven=True,
            on_phase=lambda k, r, res: self.closed.append((k, r, res)),
        )  # fmt: skip
        self.engine.start()
        for agent, _ in REGIONS[name]:
            self.send(agent, Hello(agent_id=agent, versions=[1], profile=PROFILE, models=[SHA]))

    def send(self, agent: str, header: Any, blobs: dict[str, bytes] | None = None) -> list[Any]:
        return self.engine.on_message(agent, decode(encode(header, blobs)), self.clock.now)

    def tick(self) -> list[Any]:
        self.clock.now += 0.1
        return self.engine.tick(self.clock.now)


def next_tasks(h: Harness) -> dict[str, TaskAssign]:
    """Close the round (one tick) and open the next (another)."""
    return assigns(h.tick()) or assigns(h.tick())


def test_driven_regional_engines_give_the_flat_global_state(tmp_path: Path) -> None:
    from aggregator.methods import Assignment

    rounds = 2
    flat = Harness(tmp_path / "flat", rounds=rounds, min_agents=5)
    up = Harness(tmp_path / "up", rounds=rounds, min_agents=2)
    regions = {name: Region(tmp_path / name, name) for name in REGIONS}
    for a in "abcde":
        flat.hello(a)
    for name in REGIONS:
        up.hello(name)
    flat_tasks, up_tasks = assigns(flat.tick()), assigns(up.tick())
    for rnd in range(1, rounds + 1):
        for agents in REGIONS.values():
            for agent, n in agents:
                flat.result(flat_tasks[agent], agent, n, lora_state(agent_value(agent, rnd)))
        for name, region in regions.items():
            task: TaskAssign = up_tasks[name]
            region.relay.set_task("train", rnd, Assignment(task.params, {}))
            region.engine.drive("train", rnd)
            sub = assigns(region.tick())
            assert sorted(sub) == sorted(a for a, _ in REGIONS[name])
            for agent, n in REGIONS[name]:
                state = lora_state(agent_value(agent, rnd))
                blob = payloads.encode_lora(state, method="fedit", round=rnd)
                res = TaskResult(run_id=sub[agent].run_id, round=rnd, task_id=sub[agent].task_id,
                                 agent_id=agent, method="fedit", num_examples=n,
                                 metrics={"train_loss": 1.0})  # fmt: skip
                region.send(agent, res, {"update": blob})
            region.tick()
            assert [(k, r) for k, r, _ in region.closed] == [("train", rnd)]
            region.closed.clear()
            answer = region.relay.answers.get("train", rnd)
            assert answer is not None
            data, total = answer[0]["update"], answer[1]
            res = TaskResult(run_id=task.run_id, round=rnd, task_id=task.task_id, agent_id=name,
                             method="fedit", num_examples=total, metrics={"train_loss": 1.0})  # fmt: skip
            up.send(name, res, {"update": data})
        flat_tasks, up_tasks = next_tasks(flat), next_tasks(up)
    assert flat.engine.finished and up.engine.finished
    assert_same(flat.method.global_state, up.method.global_state)
    for r in regions.values():
        r.ledger.close()
    flat.close()
    up.close()


def test_a_region_applies_its_own_robust_rule_to_its_agents(tmp_path: Path) -> None:
    """With [method.aggregation] rule = "median" in the region, a poisoned agent of the region
    moves the region's answer no more than the median lets it; the total is still answered."""
    from aggregator.tier.regional import relay_for

    relay = relay_for("fedit", {"aggregation": {"rule": "median"}}, MethodContext())
    plain = relay_for("fedit", {}, MethodContext())
    values = {"a": 0.5, "b": 0.7, "c": 1e6}  # c is poisoned
    for r in (relay, plain):
        r.begin_round(1)
        for agent, v in values.items():
            data = payloads.encode_lora(lora_state(v), method="fedit", round=1)
            r.add(r.validate(1, result("fedit", 1, agent, 4), {"update": memoryview(data)}))
        r.finish_round(1)
    robust, mean = relay.answers.get("train", 1), plain.answers.get("train", 1)
    assert robust is not None and mean is not None and robust[1] == mean[1] == 12
    got = payloads.decode(robust[0]["update"]).tensors
    want = {k: torch.stack([t[k] for t in map(lora_state, values.values())]).median(0).values
            for k in got}  # fmt: skip
    for k, v in got.items():
        torch.testing.assert_close(v, want[k])
    assert max(float(v.abs().max()) for v in got.values()) < 10
    averaged = payloads.decode(mean[0]["update"]).tensors
    assert max(float(v.abs().max()) for v in averaged.values()) > 1e5
    with pytest.raises(ConfigError, match="aggregation"):
        relay_for("fedit", {"aggregation": {"rule": "mode"}}, MethodContext())
    with pytest.raises(ConfigError, match="a region does not clip"):
        relay_for("fedit", {"aggregation": {"clip_norm": 1.0}}, MethodContext())


def test_one_agent_behind_a_region_counts_for_max_weight_at_most() -> None:
    """The upstream does not cap a listed region's count (it stands for many agents), so the
    region caps each of its agents: one claiming 10 million examples once made the region's
    answer carry 10,000,020 examples (refused upstream: all its agents' work lost) or, just
    under max_examples, the liar's values."""
    relay = RelayMethod("fedit")
    relay.begin_round(1)
    for agent, n, value in (("h0", 10, 1.0), ("h1", 10, 2.0), ("liar", 10**7, 100.0)):
        blob = payloads.encode_lora(lora_state(value), method="fedit", round=1)
        res = TaskResult(round=1, task_id=f"t-{agent}", agent_id=agent, method="fedit",
                         num_examples=n, metrics={"train_loss": 1.0})  # fmt: skip
        relay.add(relay.validate(1, res, {"update": memoryview(blob)}))
    relay.finish_round(1)
    done = relay.mean.encode(1)
    assert done is not None and done[1] == 10 + 10 + 10_000
    mean = payloads.decode(done[0]).tensors
    name = next(iter(mean))
    expected = (10 * 1.0 + 10 * 2.0 + 10_000 * 100.0) / 10_020
    assert float(mean[name][0, 0]) == pytest.approx(expected, rel=1e-5)
