"""SLoRA server half: masks, stage-1 FedAvg, the SVD switch, restarts in each stage, export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.engine.engine import RoundEngine, RoundSummary
from aggregator.errors import UpdateRejected
from aggregator.methods import MethodContext
from aggregator.methods._targets import target_shapes
from aggregator.methods.slora.math import svd_init
from aggregator.methods.slora.server import SloraServer
from aggregator.methods.slora.switch import SwitchEvals
from aggregator.ops.config import build_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from edge_agent.model.store import ResolvedModel, load_base
from protocol import payloads, randomness
from protocol.frames import decode, encode
from protocol.messages import Hello, TaskAssign, TaskResult
from protocol.methods.slora import spec
from tests.helpers.engine_harness import MODEL, PROFILE, SHA, Clock, assigns

REFERENCE = Path(__file__).resolve().parents[2] / "protocol" / "data" / "randomness-v1.json"
Q0 = "model.layers.0.self_attn.q_proj.weight"
TINY_TARGETS = {  # tiny model of tests/conftest.py, targets q_proj and v_proj
    Q0: (64, 64),
    "model.layers.0.self_attn.v_proj.weight": (32, 64),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
    "model.layers.1.self_attn.v_proj.weight": (32, 64),
}
PARAMS: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "sparse": {"stage1_rounds": 2, "density": 0.01, "target_modules": ["q_proj", "v_proj"]},
}


def reference_case() -> dict[str, Any]:
    cases = json.loads(REFERENCE.read_text(encoding="utf-8"))["cases"]
    case: dict[str, Any] = next(c for c in cases if c["seed"] == 0 and c["name"] == Q0)
    return case


def server(model_dir: Path | None, **sparse: Any) -> SloraServer:
    params = {**PARAMS, "sparse": {**PARAMS["sparse"], **sparse}}
    return SloraServer(params, MethodContext(model_dir=model_dir, seed=0))


def masked_update(s: SloraServer, round: int, fill: float, *, agent: str = "a") -> bytes:
    counts = s.mask_counts()
    assert s.shapes is not None
    values = {n: torch.arange(c, dtype=torch.float32) / 100 + fill for n, c in counts.items()}
    return payloads.encode_masked(
        values, s.shapes, seed=s.mask_seed, density=s.density, method="slora", round=round
    )


def result(round: int, agent: str, n: int) -> TaskResult:
    return TaskResult(
        run_id="run-t",
        round=round,
        task_id=f"r{round}-{agent}",
        agent_id=agent,
        method="slora",
        num_examples=n,
        metrics={"train_loss": 1.0},
    )


def test_target_shapes_come_from_the_safetensors_headers(tiny_model_dir: Path) -> None:
    assert target_shapes(tiny_model_dir, ("q_proj", "v_proj")) == TINY_TARGETS
    assert len(target_shapes(tiny_model_dir, ("q_proj", "k_proj", "v_proj", "o_proj"))) == 8


def test_server_masks_are_the_spec_reference(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir)
    case = reference_case()
    expected = case["mask_n4096_density_0.01"]
    assert s.mask_seed == 0
    assert s.mask_counts()[Q0] == len(expected) == 46
    assert not s.delta_w(Q0).any()  # zero before round 1; a unit update shows the mask
    s.values = {n: torch.ones(c) for n, c in s.mask_counts().items()}
    assert s.delta_w(Q0).reshape(-1).nonzero().squeeze(1).tolist() == expected


def test_stage1_fedavg_is_example_weighted_and_reported(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir)
    a = s.assign(1, "a", "train")
    assert a.blobs == {}  # round 1: the update is zero, nothing to send
    assert a.params["stage"] == 1 and a.params["sparse"]["mask_seed"] == 0
    s.begin_round(1)
    s.add(s.validate(1, result(1, "a", 10), {"update": memoryview(masked_update(s, 1, 1.0))}))
    s.add(s.validate(1, result(1, "b", 30), {"update": memoryview(masked_update(s, 1, 2.0))}))
    metrics = s.finish_round(1)
    assert metrics == {"examples": 40.0, "stage": 1.0, "density": 0.01}
    want = torch.arange(46, dtype=torch.float32) / 100 + 1.75  # (10·1 + 30·2) / 40
    torch.testing.assert_close(s.values[Q0], want)
    down = s.assign(2, "a", "train").blobs[spec.GLOBAL_BLOB]
    payload = payloads.decode(down)
    assert payload.kind is payloads.PayloadKind.MASKED and payload.seed == 0
    torch.testing.assert_close(payload.tensors[Q0], want)


def test_stage1_update_of_wrong_size_or_seed_is_rejected(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir)
    s.begin_round(1)
    assert s.shapes is not None
    counts = s.mask_counts()
    short = {n: torch.zeros(c - 1 if n == Q0 else c) for n, c in counts.items()}
    blob = payloads.encode_masked(short, s.shapes, seed=0, density=0.01, method="slora", round=1)
    with pytest.raises(UpdateRejected, match=r"shape \[45\], expected \[46\]"):
        s.validate(1, result(1, "a", 1), {"update": memoryview(blob)})
    other = payloads.encode_masked(
        {n: torch.zeros(c) for n, c in counts.items()},
        s.shapes,
        seed=1,
        density=0.01,
        method="slora",
        round=1,
    )
    with pytest.raises(UpdateRejected, match="seed"):
        s.validate(1, result(1, "a", 1), {"update": memoryview(other)})


def test_without_a_model_dir_round_1_votes_the_targets(tiny_model_dir: Path) -> None:
    """The first sender does not fix the targets (issue 24): an attacker answering first with
    one target weight is outvoted by the two honest agents, whose updates make the global."""
    known = server(tiny_model_dir)
    s = server(None)
    assert s.shapes is None
    liar = server(None)
    liar.shapes = {Q0: TINY_TARGETS[Q0]}
    s.begin_round(1)
    s.add(s.validate(1, result(1, "evil", 4), {"update": memoryview(masked_update(liar, 1, 9))}))
    for agent in ("a", "b"):
        blob = masked_update(known, 1, 0.5)
        s.add(s.validate(1, result(1, agent, 4), {"update": memoryview(blob)}))
    metrics = s.finish_round(1)
    assert s.shapes == TINY_TARGETS
    assert s.mask_counts() == known.mask_counts()
    assert metrics["layout_left_out"] == 1.0
    assert set(s.values) == set(TINY_TARGETS)
    assert float(s.values[Q0].max()) < 1.0  # the liar's 9s are not in it


def test_svd_init_is_the_best_rank_r_approximation() -> None:
    torch.manual_seed(3)
    delta = torch.randn(24, 40, dtype=torch.float64)
    r, scaling = 5, 16.0 / 5
    a, b, share = svd_init(delta, r, scaling, a_name="x.lora_A.weight", init_seed=0)
    assert a.shape == (5, 40) and b.shape == (24, 5)
    approx = scaling * b.double() @ a.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    torch.testing.assert_close(approx, best, rtol=0, atol=1e-5)
    # Eckart–Young: the error is exactly the energy of the dropped singular values
    err = torch.linalg.matrix_norm(delta - approx)
    assert abs(float(err) - float(s[r:].square().sum().sqrt())) < 1e-4
    assert share == pytest.approx(float(s[:r].square().sum() / s.square().sum()))


def test_large_targets_take_the_sparse_top_r_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    import aggregator.methods.slora.math as slora

    torch.manual_seed(4)
    delta = torch.randn(48, 40) * (torch.rand(48, 40) < 0.2)
    r, scaling = 4, 2.0
    dense = svd_init(delta, r, scaling, a_name="m.lora_A.weight", init_seed=0)
    monkeypatch.setattr(slora, "DENSE_SVD_MAX_DIM", 16)  # 40 > 16: ARPACK on the sparse ΔW
    sparse = svd_init(delta, r, scaling, a_name="m.lora_A.weight", init_seed=0)
    torch.testing.assert_close(sparse[1] @ sparse[0], dense[1] @ dense[0], rtol=0, atol=1e-5)
    assert sparse[2] == pytest.approx(dense[2], abs=1e-6)


def test_svd_init_of_a_zero_update_stays_trainable() -> None:
    a, b, share = svd_init(torch.zeros(8, 6), 4, 2.0, a_name="m.lora_A.weight", init_seed=7)
    assert not b.any() and share == 1.0
    assert (a.abs() > 0).all() and float(a.abs().max()) <= 1 / math.sqrt(6)


def test_switch_after_stage1_gives_the_truncated_svd_of_the_update(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir)
    for round in (1, 2):
        s.begin_round(round)
        blob = masked_update(s, round, float(round))
        s.add(s.validate(round, result(round, "a", 5), {"update": memoryview(blob)}))
        assert s.finish_round(round) == {"examples": 5.0, "stage": 1.0, "density": 0.01}
    assert s.stage == 1  # round 2's eval still measures the sparse model
    assert s.assign(2, "a", "eval").params["stage"] == 1
    s.begin_round(3)
    assert s.stage == 2 and s.svd_energy is not None and 0 < s.svd_energy < 1
    scaling = 8.0 / 4
    for name, shape in TINY_TARGETS.items():
        module = "base_model.model." + name.removesuffix(".weight")
        a, b = s.lora[f"{module}.lora_A.weight"], s.lora[f"{module}.lora_B.weight"]
        assert a.shape == (4, shape[1]) and b.shape == (shape[0], 4)
        counts = s.mask_counts()[name]
        values = torch.arange(counts, dtype=torch.float64) / 100 + 2.0
        delta = torch.zeros(math.prod(shape), dtype=torch.float64)
        key = randomness.stream_key(0, name)
        idx = torch.from_numpy(randomness.mask_indices(key, math.prod(shape), 0.01))
        delta[idx] = values
        delta = delta.reshape(shape)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
        torch.testing.assert_close(scaling * b.double() @ a.double(), best, rtol=0, atol=1e-5)
    assign = s.assign(3, "a", "train")
    assert assign.params["stage"] == 2
    down = payloads.decode(assign.blobs[spec.GLOBAL_BLOB])
    assert down.kind is payloads.PayloadKind.LORA and set(down.tensors) == set(s.lora)
    assert s.finish_round(3) == {"examples": 0.0, "stage": 2.0, "svd_energy": s.svd_energy}
    s.begin_round(4)
    assert s.finish_round(4) == {"examples": 0.0, "stage": 2.0}


# --- restart in each stage, through the real engine ------------------------------------------


class SloraHarness:
    """The round engine with a SLoRA server and two simulated agents."""

    def __init__(self, state_dir: Path, model_dir: Path, rounds: int = 4) -> None:
        raw = {
            "server": {"state_dir": str(state_dir), "heartbeat_interval": 1.0, "liveness": 3},
            "security": {"insecure": True},
            "run": {
                "run_id": "run-t",
                "method": "slora",
                "rounds": rounds,
                "min_agents": 2,
                "eval": False,
                "model_sha256": SHA,
                "round_deadline_s": 60.0,
                "seed": 5,
            },
            "method": {**PARAMS, "aggregation": {"clip_norm": 0}},  # exact means compared
        }
        self.config = build_config(raw)
        self.clock = Clock()
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        self.method = SloraServer(
            self.config.method, MethodContext(model_dir=model_dir, seed=self.config.run.seed)
        )
        self.summaries: list[RoundSummary] = []
        self.engine = RoundEngine(
            self.config,
            self.method,
            MODEL,
            ledger=self.ledger,
            store=CheckpointStore(state_dir / "checkpoints"),
            clock=self.clock,
            on_round=self.summaries.append,
        )
        self.engine.start()

    def send(self, agent: str, header: Any, blobs: dict[str, bytes] | None = None) -> list[Any]:
        return self.engine.on_message(agent, decode(encode(header, blobs)), self.clock.now)

    def join(self) -> dict[str, TaskAssign]:
        for agent in ("a", "b"):
            self.send(agent, Hello(agent_id=agent, versions=[1], profile=PROFILE, models=[SHA]))
        self.clock.now += 0.1
        return assigns(self.engine.tick(self.clock.now))

    def answer(self, task: TaskAssign, agent: str, n: int, fill: float) -> None:
        if task.params["stage"] == 1:
            blob = masked_update(self.method, task.round, fill)
        else:
            lora = {k: v + fill for k, v in self.method.lora.items()}
            blob = payloads.encode_lora(lora, method="slora", round=task.round)
        header = TaskResult(
            run_id=task.run_id,
            round=task.round,
            task_id=task.task_id,
            agent_id=agent,
            method="slora",
            num_examples=n,
            metrics={"train_loss": 1.0},
        )
        self.send(agent, header, {"update": blob})

    def round(self, tasks: dict[str, TaskAssign], fill: float) -> dict[str, TaskAssign]:
        self.answer(tasks["a"], "a", 10, fill)
        self.answer(tasks["b"], "b", 30, fill + 1)
        self.clock.now += 0.1
        self.engine.tick(self.clock.now)  # commits the round
        self.clock.now += 0.1
        return assigns(self.engine.tick(self.clock.now))

    def close(self) -> None:
        self.ledger.close()


def test_restart_resumes_stage1_then_stage2(tmp_path: Path, tiny_model_dir: Path) -> None:
    harness_dir = tmp_path / "state"
    h = SloraHarness(harness_dir, tiny_model_dir)
    tasks = h.join()
    assert {t.params["stage"] for t in tasks.values()} == {1}
    assert h.method.mask_seed == 5  # the run's seed, since the params leave it open
    tasks = h.round(tasks, 1.0)  # round 1 committed, round 2 assigned
    assert h.summaries[-1].method == {"examples": 40.0, "stage": 1.0, "density": 0.01}
    values = {k: v.clone() for k, v in h.method.values.items()}
    h.close()

    h = SloraHarness(harness_dir, tiny_model_dir)  # crash after round 1: stage 1 again
    assert h.engine.round == 1 and h.method.stage == 1 and h.method.mask_seed == 5
    assert values.keys() == h.method.values.keys()
    assert all(torch.equal(values[k], h.method.values[k]) for k in values)
    tasks = h.join()
    assert {t.params["stage"] for t in tasks.values()} == {1}
    assert tasks["a"].params["sparse"]["mask_seed"] == 5
    tasks = h.round(tasks, 2.0)  # round 2 commits in stage 1, round 3 begins with the switch
    assert h.summaries[-1].method == {"examples": 40.0, "stage": 1.0, "density": 0.01}
    assert {t.params["stage"] for t in tasks.values()} == {2}
    lora = {k: v.clone() for k, v in h.method.lora.items()}
    h.close()

    h = SloraHarness(harness_dir, tiny_model_dir)  # crash before round 3 commits
    assert h.engine.round == 2 and h.method.stage == 2 and h.method.values == {}
    assert all(torch.equal(lora[k], h.method.lora[k]) for k in lora)  # the same switch
    tasks = h.join()
    assert {t.params["stage"] for t in tasks.values()} == {2}
    tasks = h.round(tasks, 0.5)
    energy = h.method.svd_energy
    assert h.summaries[-1].method == {"examples": 40.0, "stage": 2.0, "svd_energy": energy}
    for k, before in lora.items():  # FedAvg of (lora + 0.5)·10 and (lora + 1.5)·30
        torch.testing.assert_close(h.method.lora[k], before + 1.25)
    lora = {k: v.clone() for k, v in h.method.lora.items()}
    h.close()

    h = SloraHarness(harness_dir, tiny_model_dir)  # crash after a stage-2 commit
    assert h.engine.round == 3 and h.method.stage == 2 and h.method.svd_energy == energy
    assert all(torch.equal(lora[k], h.method.lora[k]) for k in lora)
    tasks = h.join()
    assert {t.params["stage"] for t in tasks.values()} == {2}
    h.round(tasks, 0.0)
    assert h.summaries[-1].method == {"examples": 40.0, "stage": 2.0}
    assert h.engine.finished
    h.close()


def test_export_writes_a_peft_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir, stage1_rounds=1)
    s.begin_round(1)
    s.add(s.validate(1, result(1, "a", 3), {"update": memoryview(masked_update(s, 1, 1.0))}))
    s.finish_round(1)
    s.begin_round(2)
    written = s.export(tmp_path / "adapter", base_model_name="tiny")
    config = json.loads(written["config"].read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    assert load_file(str(written["weights"])).keys() == s.lora.keys()
    assert len(s.lora) == 8


def test_the_switch_runs_beside_the_engine_loop(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow switch (a real model's SVDs) holds the next round back, not the engine's loop:
    heartbeats are answered while it runs, and the round opens in stage 2 once it is done."""
    import threading
    import time

    import aggregator.methods.slora.server as slora
    from protocol.messages import Heartbeat

    release = threading.Event()
    real = SloraServer.lora_from_sparse

    def slow(self: SloraServer) -> tuple[dict[str, torch.Tensor], float]:
        assert release.wait(30)
        return real(self)

    monkeypatch.setattr(slora, "ADMIT_WAIT_S", 0.05)
    monkeypatch.setattr(SloraServer, "lora_from_sparse", slow)
    h = SloraHarness(tmp_path / "state", tiny_model_dir, rounds=3)
    try:
        tasks = h.round(h.join(), 1.0)
        assert {t.params["stage"] for t in tasks.values()} == {1}
        assert h.round(tasks, 2.0) == {}  # round 2 committed; round 3 waits for the switch
        reason = h.method.admit("a", PROFILE)
        assert reason is not None and reason.startswith("switching to LoRA")
        out = h.send("a", Heartbeat(probe=True))
        assert [o.header.type for o in out] == ["heartbeat"]  # the loop answers meanwhile
        h.clock.now += 0.1
        assert assigns(h.engine.tick(h.clock.now)) == {}
        release.set()
        deadline = time.monotonic() + 10
        tasks = {}
        while not tasks and time.monotonic() < deadline:  # admit never waits: tick until done
            time.sleep(0.02)
            h.clock.now += 0.1
            tasks = assigns(h.engine.tick(h.clock.now))
        assert sorted(tasks) == ["a", "b"] and {t.params["stage"] for t in tasks.values()} == {2}
        assert h.method.svd_energy is not None and h.method.admit("a", PROFILE) is None
    finally:
        release.set()
        h.close()


def robust_server(model_dir: Path, **aggregation: Any) -> SloraServer:
    return SloraServer({**PARAMS, "sparse": {"stage1_rounds": 1, "density": 0.01},
                        "aggregation": aggregation}, MethodContext(model_dir=model_dir, seed=0))  # fmt: skip


def test_stage1_median_ignores_a_poisoned_agent(tiny_model_dir: Path) -> None:
    s = robust_server(tiny_model_dir, rule="median")
    s.begin_round(1)
    for agent, fill in (("a", 1.0), ("b", 1.2), ("c", 1e6)):
        blob = masked_update(s, 1, fill)
        s.add(s.validate(1, result(1, agent, 5), {"update": memoryview(blob)}))
    s.finish_round(1)
    for name, count in s.mask_counts().items():  # the middle of 1.0, 1.2 and 1e6 per entry
        want = torch.arange(count, dtype=torch.float32) / 100 + 1.2
        torch.testing.assert_close(s.values[name], want)


def test_stage1_clip_bounds_the_sparse_update_exactly(tiny_model_dir: Path) -> None:
    s = robust_server(tiny_model_dir, clip_norm=0.5)
    s.begin_round(1)
    update = s.validate(1, result(1, "a", 5), {"update": memoryview(masked_update(s, 1, 3.0))})
    norm = sum(float(t.double().square().sum()) for t in update.tensors.values()) ** 0.5
    assert norm == pytest.approx(0.5, rel=1e-6) and 0 < update.metrics["clip_scale"] < 0.1
    small = robust_server(tiny_model_dir, clip_norm=1e6)
    small.begin_round(1)
    kept = small.validate(1, result(1, "a", 5), {"update": memoryview(masked_update(s, 1, 3.0))})
    assert kept.metrics["clip_scale"] == 1.0


def test_stage2_trimmed_mean_ignores_a_poisoned_agent(tiny_model_dir: Path) -> None:
    s = robust_server(tiny_model_dir, rule="trimmed_mean", trim=0.25)
    s.begin_round(1)
    s.add(s.validate(1, result(1, "a", 5), {"update": memoryview(masked_update(s, 1, 1.0))}))
    s.finish_round(1)
    s.begin_round(2)
    assert s.stage == 2
    start = {k: v.clone() for k, v in s.lora.items()}
    for agent, shift in (("a", 0.1), ("b", 0.2), ("c", 0.3), ("d", 1e6)):
        lora = {k: v + shift for k, v in start.items()}
        blob = payloads.encode_lora(lora, method="slora", round=2)
        s.add(s.validate(2, result(2, agent, 5), {"update": memoryview(blob)}))
    s.finish_round(2)
    for k, v in start.items():  # 0.1 and 1e6 trimmed: the mean of 0.2 and 0.3
        torch.testing.assert_close(s.lora[k], v + 0.25, rtol=0, atol=1e-5)


# --- the switch's variants and its measurements ------------------------------------------------


def two_stage1_rounds(s: SloraServer) -> None:
    for round in (1, 2):
        s.begin_round(round)
        blob = masked_update(s, round, float(round))
        s.add(s.validate(round, result(round, "a", 5), {"update": memoryview(blob)}))
        s.finish_round(round)
    s.begin_round(3)
    assert s.stage == 2  # (waits for the switch)


def test_random_init_ablation_starts_stage2_from_fedits_init(
    tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    from edge_agent.methods.fedit.client import lora_spec
    from edge_agent.training.lora import init_lora_state

    s = server(tiny_model_dir, init="random")
    two_stage1_rounds(s)
    assert s.stage == 2 and s.svd_energy == 0.0
    model, _ = load_base(tiny_resolved, "fp32", device="cpu")
    fedit = init_lora_state(model, lora_spec(s.params.lora), s.params.lora.init_seed)
    assert s.lora.keys() == fedit.keys()
    assert all(torch.equal(s.lora[k], fedit[k]) for k in fedit)  # bit-exact: A seeded, B = 0


def test_sparse_targets_beyond_the_lora_targets_are_trained_then_dropped(
    tiny_model_dir: Path,
) -> None:
    s = server(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj"])
    assert s.shapes is not None and len(s.shapes) == 6  # q, v and down of both layers
    two_stage1_rounds(s)
    assert {k.split(".")[-3] for k in s.lora} == {"q_proj", "v_proj"}
    only_lora = server(tiny_model_dir)
    two_stage1_rounds(only_lora)
    assert only_lora.svd_energy is not None and s.svd_energy is not None
    assert s.svd_energy < only_lora.svd_energy  # down_proj's update counts as lost
    for k, v in only_lora.lora.items():  # the masks are per weight name: same factors
        torch.testing.assert_close(s.lora[k], v)


def test_only_the_first_stage2_train_tasks_ask_for_the_switch_eval(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir)
    s.begin_round(1)
    assert s.assign(1, "a", "train").params["switch_eval"] is False
    blob = masked_update(s, 1, 1.0)
    s.add(s.validate(1, result(1, "a", 5), {"update": memoryview(blob)}))
    s.finish_round(1)
    s.begin_round(2)
    s.finish_round(2)
    s.begin_round(3)
    assert s.assign(3, "a", "train").params["switch_eval"] is True
    assert s.assign(3, "a", "eval").params["switch_eval"] is False
    s.finish_round(3)
    s.begin_round(4)
    assert s.assign(4, "a", "train").params["switch_eval"] is False


def test_switch_evals_are_example_weighted_with_the_gain_kept() -> None:
    evals = SwitchEvals()
    evals.add(
        {
            "switch_eval_examples": 10.0,
            "switch_eval_loss": 1.5,
            "switch_eval_base_loss": 2.0,
            "switch_eval_sparse_loss": 1.0,
        }
    )
    evals.add(
        {
            "switch_eval_examples": 30.0,
            "switch_eval_loss": 1.8,
            "switch_eval_base_loss": 2.2,
            "switch_eval_sparse_loss": 1.4,
            "switch_eval_em": 0.5,
        }
    )
    evals.add({"switch_eval_examples": 20.0, "switch_eval_loss": 9.0})  # no stage-1 evals kept
    evals.add({"train_loss": 1.0})  # not a switch round's update
    out = evals.result()
    assert out["switch_eval_loss"] == pytest.approx((15 + 54 + 180) / 60)
    assert out["switch_eval_base_loss"] == pytest.approx((20 + 66) / 40)
    assert out["switch_eval_em"] == pytest.approx(0.5)
    # gain kept: Σw(base − switch) / Σw(base − sparse) over the two agents with all three
    assert out["switch_gain_kept"] == pytest.approx((10 * 0.5 + 30 * 0.4) / (10 * 1.0 + 30 * 0.8))
    assert SwitchEvals().result() == {}


def test_one_agents_switch_evaluation_counts_for_its_tasks_examples_at_most() -> None:
    """An agent claiming 1e14 examples for its switch evaluation once made switch_gain_kept
    -5.2e18; its weight is now capped at the task's eval.max_examples."""
    from aggregator.methods.slora.switch import SwitchEvals

    evals = SwitchEvals(max_examples=64)
    honest = {"switch_eval_examples": 64.0, "switch_eval_loss": 1.5,
              "switch_eval_base_loss": 2.0, "switch_eval_sparse_loss": 1.4}  # fmt: skip
    liar = {"switch_eval_examples": 1e14, "switch_eval_loss": 1e6,
            "switch_eval_base_loss": 0.0, "switch_eval_sparse_loss": 1.0}  # fmt: skip
    evals.add(honest)
    evals.add(honest)
    evals.add(liar)
    out = evals.result()
    assert out["switch_eval_loss"] == pytest.approx((2 * 1.5 + 1e6) / 3)
    assert out["switch_gain_kept"] == pytest.approx((2 * 0.5 - 1e6) / (2 * 0.6 - 1.0))
