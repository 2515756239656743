"""FedPipe and FedBiOT through a regional tier give the flat run's global state.

FedPipe: the region relays the score phase (mean scores × total), plans its own agents and
answers with its mean ΔW as exact factors; the upstream's global ΔW equals the flat one.
FedBiOT: the region holds the emulator and the alignment chain it is sent and serves its agents
what each lacks; they hold the upstream's alignment state bit for bit, and the upstream's global
adapter equals the flat one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.errors import StateError, UpdateRejected
from aggregator.methods import AgentView, MethodContext
from aggregator.methods.fedbiot.relay import FedbiotRelay
from aggregator.methods.fedbiot.server import FedbiotServer
from aggregator.methods.fedpipe.relay import FedpipeRelay
from aggregator.methods.fedpipe.server import FedpipeServer
from aggregator.tier.regional import relay_for
from protocol import payloads
from protocol.methods.fedbiot import spec as fb_spec
from protocol.methods.fedbiot import state as st
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec as fp_spec
from tests.aggregator.methods.test_fedbiot_server import PARAMS as FEDBIOT_PARAMS
from tests.aggregator.methods.test_fedbiot_server import make_tiny, update_blob
from tests.aggregator.methods.test_fedbiot_server import result as fedbiot_result
from tests.aggregator.methods.test_fedbiot_server import server as fedbiot_server
from tests.aggregator.methods.test_fedpipe_server import (
    SCALE,
    blob,
    profile,
    random_update,
    score_blob,
)
from tests.aggregator.methods.test_fedpipe_server import params as fedpipe_params
from tests.aggregator.methods.test_fedpipe_server import result as fedpipe_result

REGIONS = {"east": [("a", 3), ("b", 5)], "west": [("c", 2), ("d", 7), ("e", 1)]}
ONE_CONFIG = {  # one rank, batch and precision: every agent gets the same plan flat or tiered
    "plan": {"ranks": [4], "batch_sizes": [2], "quants": ["bf16"], "capacity": 0.0},
    # flat as a region plans its agents: the global selection (per-agent selection needs each
    # agent's own importance, which a region does not pass up)
    "select": {"count": 6, "per_agent": False},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any) -> tuple[Path, Path]:
    model_dir, files = make_tiny(tmp_path_factory.mktemp("fedbiot"), embedded_tokenizer)
    return model_dir, files["public"]


def region_view(name: str, **kw: Any) -> AgentView:
    return AgentView(name, profile(), role="region", **kw)


def dense(s: FedpipeServer) -> dict[str, torch.Tensor]:
    return {m: fm.delta(a, b, SCALE) for m, (a, b) in s.global_ab.items()}


def assert_close_dw(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for m, w in want.items():
        torch.testing.assert_close(got[m], w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


def test_relay_for_picks_the_method_relays(tiny_model_dir: Path, tmp_path: Path) -> None:
    context = MethodContext(model_dir=tiny_model_dir, state_dir=tmp_path)
    assert isinstance(relay_for("fedpipe", fedpipe_params(), context), FedpipeRelay)
    assert isinstance(relay_for("fedbiot", FEDBIOT_PARAMS, context), FedbiotRelay)
    assert type(relay_for("fedit", {}, context)).__name__ == "RelayMethod"


# --- FedPipe -------------------------------------------------------------------------------------


def test_fedpipe_two_tier_equals_flat_in_delta_w_space(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def make(name: str) -> FedpipeServer:
        context = MethodContext(model_dir=tiny_model_dir, state_dir=tmp_path / name)
        return FedpipeServer(fedpipe_params(**ONE_CONFIG), context)

    flat, up = make("flat"), make("up")
    relays = {
        r: FedpipeRelay(fedpipe_params(), MethodContext(model_dir=tiny_model_dir,
                                                        state_dir=tmp_path / r))
        for r in REGIONS
    }  # fmt: skip
    for r in REGIONS:
        up.on_hello(region_view(r))
        assert up.admit(r, profile(ram_available=1)) is None  # a region is not planned
    assert up.admit("plain", profile(ram_available=1)) is not None  # an agent that small is
    # the score phase: relayed, each region answers its agents' mean and total
    values = lambda agent: {m: (ord(agent) * 7 + i * 13) % 17 + 0.5  # noqa: E731
                            for i, m in enumerate(flat.candidates)}  # fmt: skip
    for region, agents in REGIONS.items():
        relay = relays[region]
        task = up.assign(1, region, "score")
        assert task.blobs == {} and task.quant is None
        relay.set_task("score", 1, task)
        for agent, n in agents:
            res = fedpipe_result(agent, n, "score", tokens_mean=20.0)
            scores = {"scores": memoryview(score_blob(flat, values(agent)))}
            flat.add_score(1, res, scores)
            relay.add_score(1, res, scores)
        assert relay.finish_score(1)["scored_agents"] == len(agents)
        answer = relay.answers.get("score", 1)
        assert answer is not None and answer[1] == sum(n for _, n in agents)
        up.add_score(1, fedpipe_result(region, answer[1], "score"),
                     {k: memoryview(v) for k, v in answer[0].items()})  # fmt: skip
    flat.finish_score(1)
    up.finish_score(1)
    assert up.selected == flat.selected and len(flat.selected) == 6
    for m in flat.candidates:
        assert up.scores[m] == pytest.approx(flat.scores[m], rel=1e-6)

    for rnd in (1, 2, 3):
        flat.begin_round(rnd)
        flat.plan(
            rnd, "train", {a: AgentView(a, profile()) for g in REGIONS.values() for a, _ in g}
        )
        up.begin_round(rnd)
        up.plan(rnd, "train", {r: region_view(r) for r in REGIONS})
        for region, agents in REGIONS.items():
            relay = relays[region]
            task = up.assign(rnd, region, "train")
            assert task.params["ranks"] == {} and task.params["selected"] == flat.selected
            assert (fp_spec.GLOBAL_BLOB in task.blobs) == (rnd > 1)
            relay.set_task("train", rnd, task)
            relay.begin_round(rnd)
            relay.plan(rnd, "train", {a: AgentView(a, profile()) for a, _ in agents})
            for agent, n in agents:
                mine, theirs = flat.assign(rnd, agent, "train"), relay.assign(rnd, agent, "train")
                assert mine.params["ranks"] == theirs.params["ranks"]
                if rnd > 1:  # the same truncation of the same global ΔW
                    got = payloads.decode(theirs.blobs["global"]).tensors
                    want = payloads.decode(mine.blobs["global"]).tensors
                    assert_close_dw(
                        {m: fm.delta(got[fm.keys(m)[0]], got[fm.keys(m)[1]], SCALE)
                         for m in flat.selected},
                        {m: fm.delta(want[fm.keys(m)[0]], want[fm.keys(m)[1]], SCALE)
                         for m in flat.selected},
                    )  # fmt: skip
                state = random_update(flat, mine.params["ranks"], seed=ord(agent) * 10 + rnd)
                res = fedpipe_result(agent, n, round=rnd, seconds=3.0)
                flat.add(flat.validate(rnd, res, blob(state, rnd)))
                relay.add(relay.validate(rnd, res, blob(state, rnd)))
            relay.finish_round(rnd)
            answer = relay.answers.get("train", rnd)
            assert answer is not None and answer[1] == sum(n for _, n in agents)
            # the region's mean has the rank of its agents' stacked factors, above any planned one
            ranks = fm.ranks_of(payloads.decode(answer[0]["update"]).tensors)
            assert max(ranks.values()) == 4 * len(agents)
            res = fedpipe_result(region, answer[1], round=rnd)
            up.add(up.validate(rnd, res, {k: memoryview(v) for k, v in answer[0].items()}))
        flat.finish_round(rnd)
        up.finish_round(rnd)
        assert_close_dw(dense(up), dense(flat))


def test_fedpipe_free_ranks_are_for_regions_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = FedpipeServer(fedpipe_params(**ONE_CONFIG), MethodContext(model_dir=tiny_model_dir))
    s.add_score(1, fedpipe_result("a", 4, "score"),
                {"scores": memoryview(score_blob(s, {m: 1.0 for m in s.candidates}))})  # fmt: skip
    s.finish_score(1)
    s.on_hello(region_view("east"))
    s.on_hello(AgentView("a", profile()))
    s.begin_round(1)
    s.plan(1, "train", {"east": region_view("east"), "a": AgentView("a", profile())})
    wide = {m: 12 for m in s.selected}  # above the planned 4: fine for a region's mean only
    res = fedpipe_result("east", 9)
    s.validate(1, res, blob(random_update(s, wide, 1), 1))
    with pytest.raises(UpdateRejected, match="shape"):
        s.validate(1, fedpipe_result("a", 9), blob(random_update(s, wide, 1), 1))
    m = s.candidates[s.selected[0]]
    too_big = {**wide, m.name: min(m.in_features, m.out_features) + 1}
    with pytest.raises(UpdateRejected, match=r"exceeds min\(out, in\)"):
        s.validate(1, res, blob(random_update(s, too_big, 1), 1))


def test_fedpipe_relay_refuses_a_train_task_without_a_selection(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    relay = FedpipeRelay(fedpipe_params(), MethodContext(model_dir=tiny_model_dir))
    from aggregator.methods import Assignment

    with pytest.raises(StateError, match="no usable selection"):
        relay.set_task("train", 1, Assignment(params=fedpipe_params()))
    # the evaluation before round 1 (no selection, no global yet) is relayed: the base model
    up = FedpipeServer(fedpipe_params(), MethodContext(model_dir=tiny_model_dir))
    up.on_hello(region_view("east"))
    relay.set_task("eval", 0, up.assign(0, "east", "eval"))
    relay.plan(0, "eval", {"a": AgentView("a", profile())})
    task = relay.assign(0, "a", "eval")
    assert task.blobs == {} and task.quant is not None


# --- FedBiOT ------------------------------------------------------------------------------------


class Agent:
    """What an agent under a region holds: the bundle (by sha) and its alignment state."""

    def __init__(self) -> None:
        self.bundle = ""
        self.version: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def receive(self, blobs: dict[str, bytes], info: fb_spec.TaskInfo, targets: Any, r: int,
                seed: int) -> None:  # fmt: skip
        if fb_spec.EMULATOR_BLOB in blobs:
            self.bundle = hashlib.sha256(blobs[fb_spec.EMULATOR_BLOB]).hexdigest()
        assert self.bundle == info.emulator_sha256
        if fb_spec.ALIGN_BLOB in blobs:
            specs = st.state_specs(targets, r)
            parsed = st.decode_align(blobs[fb_spec.ALIGN_BLOB], specs)
            current = (self.version, self.state) if self.state is not None else None
            assert current is None or current[0] is not None
            self.version, self.state = st.advance(
                current,  # type: ignore[arg-type]
                parsed,
                lambda sha: None,
                lambda: st.init_state(targets, r, seed),
            )
        assert self.version == info.align_version
        assert self.state is not None
        assert st.state_sha(self.state, self.version) == info.align_sha256


def test_fedbiot_two_tier_equals_flat_and_agents_hold_the_upstreams_emulator(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    flat, up = fedbiot_server(*tiny), fedbiot_server(*tiny)
    flat.prepare()
    up.prepare()
    relays = {
        r: FedbiotRelay(FEDBIOT_PARAMS, MethodContext(state_dir=tmp_path / r)) for r in REGIONS
    }
    agents = {a: Agent() for g in REGIONS.values() for a, _ in g}
    for region, members in REGIONS.items():
        up.on_hello(region_view(region))
        for a, _ in members:
            relays[region].on_hello(AgentView(a, profile()))
    align = up.params.align
    for rnd in (1, 2, 3):
        if rnd == 3:  # the west region restarts: it keeps the bundle and its state on disk
            west = relays["west"]
            relays["west"] = FedbiotRelay(
                FEDBIOT_PARAMS, MethodContext(state_dir=tmp_path / "west")
            )
            holds = frozenset(west.objects.holdings())
            assert holds == {west.copies.bundle_sha, west.copies.shas[west.copies.version]}
            up.on_hello(region_view("west", holds=holds))
            for a, _ in REGIONS["west"]:
                held = {west.copies.bundle_sha, st.state_sha(agents[a].state, agents[a].version)}
                relays["west"].on_hello(AgentView(a, profile(), holds=frozenset(held)))
        flat.begin_round(rnd)
        up.begin_round(rnd)
        for region, members in REGIONS.items():
            relay = relays[region]
            task = up.assign(rnd, region, "train")
            assert (fb_spec.EMULATOR_BLOB in task.blobs) == (rnd == 1)  # once, even after a restart
            relay.set_task("train", rnd, task)
            relay.begin_round(rnd)
            info = fb_spec.TaskInfo.model_validate(task.params["task"])
            for a, n in members:
                flat.assign(rnd, a, "train")
                mine = relay.assign(rnd, a, "train")
                assert mine.params == task.params
                assert (fb_spec.EMULATOR_BLOB in mine.blobs) == (rnd == 1)
                agents[a].receive(dict(mine.blobs), info, relay._targets, align.r, align.seed)
                assert up.copies.state is not None and agents[a].state is not None
                assert all(torch.equal(agents[a].state[k], v) for k, v in up.copies.state.items())
                fill = ord(a) * 0.01 + rnd * 0.1
                flat.add(
                    flat.validate(
                        rnd,
                        fedbiot_result(rnd, a, n),
                        {"update": memoryview(update_blob(flat, rnd, fill))},
                    )
                )
                relay.add(relay.validate(rnd, fedbiot_result(rnd, a, n),
                                         {"update": memoryview(update_blob(up, rnd, fill))}))  # fmt: skip
            relay.finish_round(rnd)
            answer = relay.answers.get("train", rnd)
            assert answer is not None and answer[1] == sum(n for _, n in members)
            up.add(up.validate(rnd, fedbiot_result(rnd, region, answer[1]),
                               {k: memoryview(v) for k, v in answer[0].items()}))  # fmt: skip
        flat.finish_round(rnd)
        up.finish_round(rnd)
        assert flat.global_state.keys() == up.global_state.keys()
        for k, v in flat.global_state.items():
            torch.testing.assert_close(up.global_state[k], v, rtol=1e-6, atol=1e-7)


def test_fedbiot_relay_takes_only_updates_on_the_tasks_emulator(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    up: FedbiotServer = fedbiot_server(*tiny)
    up.prepare()
    up.on_hello(region_view("east"))
    relay = FedbiotRelay(FEDBIOT_PARAMS, MethodContext(state_dir=tmp_path))
    relay.set_task("train", 1, up.assign(1, "east", "train"))
    relay.begin_round(1)
    good = update_blob(up, 1, 0.5)
    stale = payloads.encode(
        payloads.PayloadKind.LORA,
        payloads.decode(good).tensors,
        method="fedbiot",
        round=1,
        meta={"fedbiot.emulator": up.copies.bundle_sha, "fedbiot.align": "0" * 64},
    )
    with pytest.raises(UpdateRejected, match="fedbiot.align"):
        relay.validate(1, fedbiot_result(1, "a", 3), {"update": memoryview(stale)})
    relay.add(relay.validate(1, fedbiot_result(1, "b", 3), {"update": memoryview(good)}))
    assert relay.finish_round(1)["examples"] == 3.0


# --- the score phase through a driven regional engine -------------------------------------------


def test_a_driven_engine_relays_fedpipe_scores_and_plans_its_agents(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine_harness import MODEL, SHA, Clock, assigns

    from aggregator.engine.engine import RoundEngine
    from aggregator.ops.config import build_config
    from aggregator.store.checkpoint import CheckpointStore
    from aggregator.store.ledger import Ledger
    from protocol.frames import decode, encode
    from protocol.messages import Hello, TaskResult

    up = FedpipeServer(fedpipe_params(**ONE_CONFIG), MethodContext(model_dir=tiny_model_dir))
    up.on_hello(region_view("east"))
    relay = FedpipeRelay(fedpipe_params(), MethodContext(model_dir=tiny_model_dir,
                                                         state_dir=tmp_path))  # fmt: skip
    config = build_config({
        "server": {"state_dir": str(tmp_path), "heartbeat_interval": 1.0, "liveness": 3},
        "security": {"insecure": True},
        "run": {"run_id": "region-east", "rounds": 100_000, "min_agents": 2,
                "model_sha256": SHA, "round_deadline_s": 60.0},
    })  # fmt: skip
    clock, closed = Clock(), []
    ledger = Ledger(tmp_path / "ledger.sqlite")
    engine = RoundEngine(
        config, relay, MODEL, ledger=ledger, store=CheckpointStore(tmp_path / "checkpoints"),
        clock=clock, driven=True, on_phase=lambda k, r, res: closed.append((k, r)),
    )  # fmt: skip
    engine.start()

    def send(agent: str, header: Any, blobs: dict[str, bytes] | None = None) -> list[Any]:
        return engine.on_message(agent, decode(encode(header, blobs)), clock.now)

    def tick() -> dict[str, Any]:
        clock.now += 0.1
        return assigns(engine.tick(clock.now))

    for agent in "ab":
        send(agent, Hello(agent_id=agent, versions=[1], profile=profile(), models=[SHA]))
    relay.set_task("score", 1, up.assign(1, "east", "score"))
    engine.drive("score", 1)
    tasks = tick()
    assert sorted(tasks) == ["a", "b"] and {t.kind for t in tasks.values()} == {"score"}
    for agent, n in (("a", 3), ("b", 5)):
        t = tasks[agent]
        res = TaskResult(run_id=t.run_id, round=1, task_id=t.task_id, agent_id=agent,
                         method="fedpipe", kind="score", num_examples=n)  # fmt: skip
        values = {m: float(i + ord(agent)) for i, m in enumerate(relay.candidates)}
        send(agent, res, {"scores": score_blob(relay, values)})
    tick()
    assert closed == [("score", 1)]  # the engine hands the closed score phase to the region
    answer = relay.answers.get("score", 1)
    assert answer is not None and answer[1] == 8
    scores = payloads.decode(answer[0]["scores"]).tensors
    first = next(iter(relay.candidates))
    n = len(relay.candidates)  # each agent's scores as shares of its total
    total = {a: sum(i + ord(a) for i in range(n)) for a in "ab"}
    share = (3 * ord("a") / total["a"] + 5 * ord("b") / total["b"]) / 8
    assert float(scores[first][0]) == pytest.approx(share)
    up.add_score(1, fedpipe_result("east", 8, "score"), {"scores": memoryview(answer[0]["scores"])})
    up.finish_score(1)
    up.begin_round(1)
    relay.set_task("train", 1, up.assign(1, "east", "train"))
    engine.drive("train", 1)
    tasks = tick()
    assert {t.kind for t in tasks.values()} == {"train"} and sorted(tasks) == ["a", "b"]
    assert all(t.params["ranks"] == dict.fromkeys(up.selected, 4) for t in tasks.values())
    ledger.close()


def test_fedbiot_relay_takes_and_serves_the_bundle_in_parts(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    params = {**FEDBIOT_PARAMS, "emulator": {"part_mb": 1}}
    up = FedbiotServer(params, MethodContext(model_dir=tiny[0], public_data=tiny[1]))
    up.prepare()
    up.on_hello(region_view("east"))
    task = up.assign(1, "east", "train")
    assert fb_spec.EMULATOR_BLOB not in task.blobs and f"{fb_spec.EMULATOR_BLOB}.1" in task.blobs
    relay = FedbiotRelay(FEDBIOT_PARAMS, MethodContext(state_dir=tmp_path))
    relay.set_task("train", 1, task)
    assert relay.copies.bundle == up.copies.bundle
    assert relay.objects.has(up.copies.bundle_sha)
    sent = relay.assign(1, "a", "train").blobs
    assert fb_spec.bundle_of(sent) == up.copies.bundle and len(sent) == len(task.blobs)
