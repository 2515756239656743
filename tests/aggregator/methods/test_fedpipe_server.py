"""FedPipe server half on the tiny model: selection, plans, exact mixed-rank aggregation, the
truncated SVD each agent receives, checkpoints, export, and a run through the round engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import engine_harness
import pytest
import torch
from engine_harness import PROFILE, SHA, Harness, assigns
from safetensors.torch import load_file

from aggregator.errors import ConfigError, UpdateRejected
from aggregator.methods import AgentView, MethodContext
from aggregator.methods.fedpipe.server import FedpipeServer
from protocol import payloads
from protocol.lora_init import initial_a
from protocol.messages import Hello, Profile, TaskAssign, TaskResult
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec

ALPHA = 8.0
SCALE = spec.FedpipeLora(r=4, alpha=ALPHA).module_scaling  # the default: ALPHA / r


def params(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lora": {"r": 4, "alpha": ALPHA},
        "train": {"steps": 2, "batch_size": 2, "max_len": 32},
        "plan": {"ranks": [1, 2, 4, 8], "batch_sizes": [1, 2], "capacity": 0.0},
        "select": {"count": 6},
    }
    out.update(extra)
    return out


def server(model_dir: Path, state_dir: Path | None, **extra: Any) -> FedpipeServer:
    return FedpipeServer(params(**extra), MethodContext(model_dir=model_dir, state_dir=state_dir))


def profile(**kw: Any) -> Profile:
    return PROFILE.model_copy(update={"matmul_gflops_fp32": 50.0, "matmul_gflops_bf16": 30.0, **kw})


def view(agent: str, bandwidth: float, **kw: Any) -> AgentView:
    return AgentView(agent, profile(**kw), bandwidth_mbps=bandwidth)


def score_blob(s: FedpipeServer, values: dict[str, float], round: int = 1) -> bytes:
    tensors = {m: torch.tensor([values.get(m, 0.0)]) for m in s.candidates}
    return payloads.encode_dense(tensors, method="fedpipe", round=round)


def result(agent: str, n: int, kind: str = "train", round: int = 1, **metrics: float) -> TaskResult:
    return TaskResult(
        run_id="r",
        round=round,
        task_id=f"t-{agent}-{kind}-{round}",
        agent_id=agent,
        method="fedpipe",
        kind=kind,
        num_examples=n,
        metrics=metrics,  # type: ignore[arg-type]
    )


def selected_server(model_dir: Path, state_dir: Path | None = None, **extra: Any) -> FedpipeServer:
    s = server(model_dir, state_dir, **extra)
    values = {m: float(i + 1) for i, m in enumerate(s.candidates)}  # later modules matter more
    s.add_score(
        1, result("a", 4, "score", tokens_mean=20.0), {"scores": memoryview(score_blob(s, values))}
    )
    s.finish_score(1)
    return s


def random_update(s: FedpipeServer, ranks: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, r in ranks.items():
        m = s.candidates[module]
        a_key, b_key = fm.keys(module)
        state[a_key] = torch.randn(r, m.in_features, generator=g) / 8
        state[b_key] = torch.randn(m.out_features, r, generator=g) / 8
    return state


def blob(state: dict[str, torch.Tensor], round: int) -> dict[str, memoryview]:
    return {"update": memoryview(payloads.encode_lora(state, method="fedpipe", round=round))}


# --- selection ----------------------------------------------------------------------------------


def test_scores_are_averaged_by_examples_and_the_top_modules_selected(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    s = server(tiny_model_dir, tmp_path)
    assert len(s.candidates) == 14 and s.wants_score(1)
    names = list(s.candidates)
    a = {m: 1.0 for m in names} | {names[0]: 10.0, names[1]: 0.0}
    b = {m: 1.0 for m in names} | {names[0]: 0.0, names[1]: 4.0}
    s.add_score(
        1, result("a", 1, "score", tokens_mean=30.0), {"scores": memoryview(score_blob(s, a))}
    )
    s.add_score(
        1, result("b", 3, "score", tokens_mean=50.0), {"scores": memoryview(score_blob(s, b))}
    )
    metrics = s.finish_score(1)
    assert metrics["selected"] == 6.0 and not s.wants_score(1)
    # each agent's scores as shares of its total (a: 22, b: 16), weighted by its examples
    assert s.scores[names[0]] == pytest.approx((10 / 22 * 1 + 0) / 4)
    assert s.scores[names[1]] == pytest.approx((0 + 4 / 16 * 3) / 4)
    assert s.selected[:2] == [names[1], names[0]]
    assert s.tokens == {"a": 30.0, "b": 50.0}
    again = server(tiny_model_dir, tmp_path)  # a restart before any checkpoint: no rescoring
    assert again.selected == s.selected and not again.wants_score(1)
    _, meta = again.state()
    assert json.loads(meta["selected"]) == s.selected and "6 of 14 matrices" in meta["selection"]


@pytest.mark.parametrize(("rule", "claim"), [("fedavg", "scale"), ("median", "scale"),
                                           ("median", "examples"), ("trimmed_mean", "examples")])  # fmt: skip
def test_one_liar_does_not_decide_the_selection(
    tiny_model_dir: Path, tmp_path: Path, rule: str, claim: str
) -> None:
    """Three honest agents favour the first two matrices; one liar favours the last two with
    scores of 1e30 (counted as shares of its total, like anyone's), or claiming 10 million
    examples (under a robust rule one agent is one vote). Before, raw scores weighted by the
    raw claim: the liar's two matrices were selected either way."""
    s = server(tiny_model_dir, tmp_path, aggregation={"rule": rule, "trim": 0.25})
    names = list(s.candidates)
    honest = {m: 1.0 for m in names} | {names[0]: 5.0, names[1]: 5.0}
    for agent in ("h1", "h2", "h3"):
        blob = score_blob(s, honest)
        s.add_score(1, result(agent, 500, "score", tokens_mean=30.0), {"scores": memoryview(blob)})
    scale, n = (1e30, 1) if claim == "scale" else (50.0, 10_000_000)
    liar = {m: 0.0 for m in names} | {names[-1]: scale, names[-2]: scale}
    blob = score_blob(s, liar)
    s.add_score(1, result("liar", n, "score", tokens_mean=30.0), {"scores": memoryview(blob)})
    s.finish_score(1)
    assert s.selected[:2] == [names[0], names[1]]


def test_a_claim_counts_for_max_weight_examples_in_the_weighted_mean(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    s = server(tiny_model_dir, tmp_path)
    names = list(s.candidates)
    for agent, n, top in (("a", 100, names[0]), ("b", 10_000_000, names[1])):
        blob = score_blob(s, {m: 0.0 for m in names} | {top: 1.0})
        s.add_score(1, result(agent, n, "score", tokens_mean=30.0), {"scores": memoryview(blob)})
    s.finish_score(1)
    assert s.scores[names[0]] == pytest.approx(100 / 10_100)  # b: max_weight, 10,000
    assert s.scores[names[1]] == pytest.approx(10_000 / 10_100)


@pytest.mark.parametrize("problem", ["unknown", "negative", "missing", "tokens", "nan"])
def test_bad_scores_are_rejected(tiny_model_dir: Path, problem: str) -> None:
    s = server(tiny_model_dir, None)
    tensors = {m: torch.tensor([1.0]) for m in s.candidates}
    metrics = {"tokens_mean": 300.0 if problem == "tokens" else 20.0}
    if problem == "unknown":
        tensors["model.layers.9.mlp.up_proj"] = torch.tensor([1.0])
    elif problem == "negative":
        tensors[next(iter(s.candidates))] = torch.tensor([-1.0])
    elif problem == "missing":
        del tensors[next(iter(s.candidates))]
    elif problem == "nan":
        tensors[next(iter(s.candidates))] = torch.tensor([12345.0])
    data = payloads.encode_dense(tensors, method="fedpipe", round=1)
    if problem == "nan":  # the encoder refuses NaN: poke it into the bytes as a hostile agent would
        import struct

        data = data.replace(struct.pack("<f", 12345.0), struct.pack("<f", float("nan")))
    with pytest.raises(UpdateRejected):
        s.add_score(1, result("a", 2, "score", **metrics), {"scores": memoryview(data)})
    assert s.selection._shares == []


def test_no_valid_scores_rescore_once_then_fall_back_to_layer_order(tiny_model_dir: Path) -> None:
    s = server(tiny_model_dir, None)
    assert s.finish_score(1) == {"scored_agents": 0.0} and s.wants_score(1)
    assert s.finish_score(1)["score_fallback"] == 1.0
    assert s.selected == list(s.candidates)[:6]


def test_fedpipe_needs_the_model_files() -> None:
    with pytest.raises(ConfigError, match="model_dir"):
        FedpipeServer(params(), MethodContext())


# --- plans --------------------------------------------------------------------------------------


def test_plan_gives_each_agent_its_ranks_batch_and_precision(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir)
    s.plan(1, "train", {"fast": view("fast", 1000.0), "slow": view("slow", 0.01)})
    fast, slow = (s.assign(1, a, "train") for a in ("fast", "slow"))
    assert fast.blobs == {} and slow.blobs == {}  # round 1: everyone starts from the seeded init
    p_fast, p_slow = (spec.Params.model_validate(a.params) for a in (fast, slow))
    assert set(p_fast.ranks) == set(s.selected) == set(p_slow.ranks)
    assert sum(p_slow.ranks.values()) < sum(p_fast.ranks.values())
    assert p_slow.ranks[s.selected[-1]] <= p_slow.ranks[s.selected[0]]  # importance tiers
    details = s.agent_details(1)
    assert details["slow"]["quant"] == slow.quant and details["fast"]["batch"] == str(
        p_fast.train.batch_size
    )
    assert p_fast.train.steps * p_fast.train.batch_size >= 4  # examples_per_round = 2 x 2


def test_admit_refuses_an_agent_without_memory_for_the_smallest_configuration(
    tiny_model_dir: Path,
) -> None:
    s = selected_server(tiny_model_dir)
    assert s.admit("big", profile()) is None
    reason = s.admit("small", profile(ram_available=300 * 2**20))
    assert reason is not None and "300 MiB RAM" in reason and "smallest configuration" in reason


# --- aggregation --------------------------------------------------------------------------------


def run_round(
    s: FedpipeServer, views: dict[str, AgentView], round: int, seed: int
) -> dict[str, Any]:
    s.begin_round(round)
    s.plan(round, "train", views)
    updates = {}
    for i, agent in enumerate(sorted(views)):
        a = s.assign(round, agent, "train")
        ranks = spec.Params.model_validate(a.params).ranks
        updates[agent] = (random_update(s, ranks, seed + i), 3 + 2 * i)
        r = result(agent, updates[agent][1], round=round)
        s.add(s.validate(round, r, blob(updates[agent][0], round)))
    s.finish_round(round)
    return updates


def dense_global(s: FedpipeServer) -> dict[str, torch.Tensor]:
    return {m: fm.delta(a, b, s.params.lora.module_scaling) for m, (a, b) in s.global_ab.items()}


@pytest.mark.parametrize("rslora", [True, False])
def test_mixed_rank_aggregate_is_the_weighted_mean_of_the_delta_ws(
    tiny_model_dir: Path, rslora: bool
) -> None:
    s = selected_server(tiny_model_dir, lora={"r": 4, "alpha": ALPHA, "rslora": rslora})
    scale = s.params.lora.module_scaling
    assert scale(1) == pytest.approx(ALPHA / 2 if rslora else ALPHA)  # alpha/sqrt(r·4), alpha/r
    views = {"a": view("a", 1000.0), "b": view("b", 0.05), "c": view("c", 3.0)}
    updates = run_round(s, views, 1, seed=0)
    ranks = {
        a: {fm.module_of(k): v.shape[0] for k, v in u.items() if k.endswith("A.weight")}
        for a, (u, _) in updates.items()
    }
    assert len({tuple(sorted(r.items())) for r in ranks.values()}) > 1  # really mixed ranks
    total = sum(n for _, n in updates.values())
    for module in s.selected:
        a_key, b_key = fm.keys(module)
        want = sum(n * fm.delta(u[a_key], u[b_key], scale) for u, n in updates.values()) / total
        got = dense_global(s)[module]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert s.global_ab[module][0].shape[0] <= sum(r[module] for r in ranks.values())


@pytest.mark.parametrize("rslora", [True, False])
def test_each_agent_receives_the_best_rank_r_approximation(
    tiny_model_dir: Path, rslora: bool
) -> None:
    s = selected_server(tiny_model_dir, lora={"r": 4, "alpha": ALPHA, "rslora": rslora})
    views = {"a": view("a", 1000.0), "b": view("b", 0.05), "c": view("c", 3.0)}
    run_round(s, views, 1, seed=1)
    s.begin_round(2)
    s.plan(2, "train", views)
    glob = dense_global(s)
    for agent in views:
        a = s.assign(2, agent, "train")
        ranks = spec.Params.model_validate(a.params).ranks
        sent = payloads.decode(
            a.blobs["global"], payloads.Expect(kind=payloads.PayloadKind.LORA, round=2)
        )
        assert fm.ranks_of(sent.tensors) == ranks
        for module, r in ranks.items():
            a_key, b_key = fm.keys(module)
            approx = fm.delta(
                sent.tensors[a_key], sent.tensors[b_key], s.params.lora.module_scaling
            )
            u, sv, vh = torch.linalg.svd(glob[module])
            best = (u[:, :r] * sv[:r]) @ vh[:r]
            scale = float(sv[0])
            torch.testing.assert_close(approx, best, rtol=0, atol=2e-6 * scale)
            # Eckart–Young: the error is exactly the energy of the dropped singular values
            err = float(torch.linalg.norm(glob[module] - approx))
            assert err == pytest.approx(float(sv[r:].square().sum().sqrt()), abs=2e-6 * scale)


def test_a_rank_above_the_global_rank_gets_seeded_rows_that_change_nothing(
    tiny_model_dir: Path,
) -> None:
    s = selected_server(tiny_model_dir)
    module = s.selected[0]
    a_key, b_key = fm.keys(module)
    m = s.candidates[module]
    low = {a_key: torch.randn(1, m.in_features), b_key: torch.randn(m.out_features, 1)}
    acc = fm.LowRankSum()
    acc.add(low[a_key], low[b_key], 1.0, SCALE)
    a_glob, b_glob = fm.global_factors(*acc.svd(1.0), SCALE)
    assert a_glob.shape[0] == 1
    a8, b8 = fm.truncate(a_glob, b_glob, 8, SCALE, a_key=a_key, init_seed=0)
    torch.testing.assert_close(
        fm.delta(a8, b8, SCALE), fm.delta(low[a_key], low[b_key], SCALE), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(a8[1:], initial_a(a_key, 8, m.in_features, 0)[1:])
    assert float(b8[:, 1:].abs().max()) == 0.0


def test_updates_with_the_wrong_ranks_are_rejected(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir)
    s.plan(1, "train", {"a": view("a", 1000.0)})
    ranks = spec.Params.model_validate(s.assign(1, "a", "train").params).ranks
    wrong = {m: (r % 8) + 1 for m, r in ranks.items()}
    with pytest.raises(UpdateRejected, match="shape"):
        s.validate(1, result("a", 3), blob(random_update(s, wrong, 0), 1))
    with pytest.raises(UpdateRejected, match="no plan"):
        s.validate(1, result("zz", 3), blob(random_update(s, ranks, 0), 1))
    fewer = dict(list(ranks.items())[:-1])
    with pytest.raises(UpdateRejected, match="names"):
        s.validate(1, result("a", 3), blob(random_update(s, fewer, 0), 1))


def test_measured_training_times_correct_the_next_estimates(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir)
    views = {"a": view("a", 1000.0), "b": view("b", 1000.0)}
    s.plan(1, "train", views)
    for agent, slower in (("a", 1.0), ("b", 4.0)):  # b's machine is 4x slower than its profile
        ranks = spec.Params.model_validate(s.assign(1, agent, "train").params).ranks
        took = slower * s.plans[1][agent].compute_s
        r = result(agent, 4, seconds=took)
        s.add(s.validate(1, r, blob(random_update(s, ranks, 0), 1)))
    s.finish_round(1)
    assert s.speed["a"] == pytest.approx(1.0) and s.speed["b"] == pytest.approx(0.25)
    assert float(s.agent_details(1)["b"]["train_s"]) == pytest.approx(
        4 * s.plans[1]["b"].compute_s, abs=0.05
    )
    s.plan(2, "train", views)
    a2, b2 = s.plans[2]["a"], s.plans[2]["b"]
    assert b2.speed == pytest.approx(0.25)  # round 2's plan of b is made at its learnt speed
    assert sum(b2.tier_ranks) <= sum(a2.tier_ranks)
    tensors, meta = s.state()
    other = server(tiny_model_dir, None)
    other.restore(tensors, meta)
    assert other.speed == pytest.approx(s.speed)


# --- state, restart, export ---------------------------------------------------------------------


def test_checkpoint_restores_the_same_global_and_payloads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    s = selected_server(tiny_model_dir, tmp_path / "one")
    views = {"a": view("a", 1000.0), "b": view("b", 0.05)}
    run_round(s, views, 1, seed=2)
    tensors, meta = s.state()
    other = server(tiny_model_dir, tmp_path / "two")  # another state dir: only the checkpoint
    assert other.wants_score(1)
    other.restore(tensors, meta)
    assert other.selected == s.selected and not other.wants_score(2)
    for m, (a, b) in s.global_ab.items():
        assert torch.equal(other.global_ab[m][0], a) and torch.equal(other.global_ab[m][1], b)
    for srv in (s, other):
        srv.plan(2, "train", views)
    assert (
        other.assign(2, "b", "train").blobs["global"] == s.assign(2, "b", "train").blobs["global"]
    )
    assert other.assign(2, "a", "eval").blobs["global"] == s.assign(2, "a", "eval").blobs["global"]


@pytest.mark.parametrize("rslora", [False, True])
def test_export_merges_the_global_delta_w_into_the_base(
    tiny_model_dir: Path, tmp_path: Path, rslora: bool
) -> None:
    s = selected_server(tiny_model_dir, lora={"r": 4, "alpha": ALPHA, "rslora": rslora})
    run_round(s, {"a": view("a", 1000.0), "b": view("b", 0.05)}, 1, seed=3)
    out = s.export(tmp_path / "export", base_model_name="tiny")
    merged = load_file(str(out["weights"]))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if module in s.global_ab:
            a, b = s.global_ab[module]
            torch.testing.assert_close(
                merged[name],
                w + fm.delta(a, b, lambda r: ALPHA / ((4 * r) ** 0.5 if rslora else r)).float(),
                rtol=1e-5,
                atol=1e-6,
            )
        else:
            assert torch.equal(merged[name], w)
    assert (out["model"] / "config.json").exists() and not (
        out["model"] / "adapter_config.json"
    ).exists()
    assert json.loads((out["model"] / "fedpipe.json").read_text())["selected"] == s.selected


# --- through the round engine -------------------------------------------------------------------


def fedpipe_harness(state_dir: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    """The harness with a FedPipe server from the start (a restart replays through it)."""
    context = MethodContext(model_dir=model_dir, state_dir=state_dir)
    monkeypatch.setattr(
        engine_harness, "FeditServer", lambda _cfg, _ctx: FedpipeServer(params(), context)
    )
    return Harness(state_dir, rounds=2)  # its run says fedit: the engine itself is method-blind


def send_result(
    h: Harness, assign: TaskAssign, agent: str, n: int, blobs: dict[str, bytes], **m: float
) -> None:
    header = TaskResult(
        run_id=assign.run_id,
        round=assign.round,
        task_id=assign.task_id,
        agent_id=agent,
        method="fedpipe",
        kind=assign.kind,
        num_examples=n,
        metrics={"train_loss": 1.0, **m},
    )
    h.send(agent, header, blobs)


def test_engine_runs_score_then_planned_rounds_and_resumes_a_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = fedpipe_harness(tmp_path, tiny_model_dir, monkeypatch)
    for agent, limit in (("a", None), ("b", 1.0)):
        prof = profile() if limit is None else profile(bandwidth_mbps=limit)
        h.send(agent, Hello(agent_id=agent, versions=[1], profile=prof, models=[SHA]))
    scoring = assigns(h.tick())
    assert {t.kind for t in scoring.values()} == {"score"}
    method = h.engine.method
    assert isinstance(method, FedpipeServer)
    for agent, task in scoring.items():
        values = {m: float(len(m) + (agent == "a")) for m in method.candidates}
        send_result(h, task, agent, 4, {"scores": score_blob(method, values)}, tokens_mean=20.0)
    train = assigns(h.tick())
    assert {t.kind for t in train.values()} == {"train"} and len(method.selected) == 6
    for i, (agent, task) in enumerate(sorted(train.items())):
        ranks = spec.Params.model_validate(task.params).ranks
        send_result(
            h,
            task,
            agent,
            5,
            {
                "update": payloads.encode_lora(
                    random_update(method, ranks, i), method="fedpipe", round=1
                )
            },
        )
    h.tick()
    (summary,) = h.summaries
    assert summary.method["selected"] == 6.0 and "est_max_s" in summary.method
    assert {"rank", "quant", "batch", "est_s"} <= set(summary.per_agent["b"])
    assert int(summary.per_agent["b"]["up"]) < int(
        summary.per_agent["a"]["up"]
    )  # slow link: lower rank
    round2 = assigns(h.tick())
    first = sorted(round2)[0]
    task = round2[first]
    ranks = spec.Params.model_validate(task.params).ranks
    send_result(
        h,
        task,
        first,
        5,
        {
            "update": payloads.encode_lora(
                random_update(method, ranks, 9), method="fedpipe", round=2
            )
        },
    )
    h.close()
    # restart: the stored round-2 update is replayed against the saved plan, nothing rescored
    h2 = fedpipe_harness(tmp_path, tiny_model_dir, monkeypatch)
    m2 = h2.engine.method
    assert isinstance(m2, FedpipeServer)
    assert m2.selected == method.selected and set(m2.plans[2]) == set(round2)
    assert m2._combined.weight == 5
    h2.close()


# --- per-agent selection, reselection, per-weight ranks, fitted constants -----------------------


def sens_blob(values: dict[str, float], round: int) -> memoryview:
    tensors = {m: torch.tensor([v]) for m, v in values.items()}
    return memoryview(payloads.encode_dense(tensors, method="fedpipe", round=round))


def train_round(
    s: FedpipeServer, round: int, sens: dict[str, dict[str, float]], **metrics: float
) -> dict[str, dict[str, torch.Tensor]]:
    s.begin_round(round)
    states = {}
    for i, agent in enumerate(sorted(s.plans[round])):
        ranks = spec.Params.model_validate(s.assign(round, agent, "train").params).ranks
        states[agent] = random_update(s, ranks, i)
        blobs = blob(states[agent], round)
        if agent in sens:
            blobs["sensitivity"] = sens_blob(sens[agent], round)
        res = result(agent, 4, round=round).model_copy(update={"metrics": metrics})
        s.add(s.validate(round, res, blobs))
    s.finish_round(round)
    return states


def test_each_agent_adapts_its_own_matrices_chosen_again_every_two_rounds(
    tiny_model_dir: Path,
) -> None:
    s = server(tiny_model_dir, None)
    names = list(s.candidates)  # 14, layer order
    up = {m: float(i + 1) for i, m in enumerate(names)}  # a: later matrices matter more
    down = {m: float(14 - i) for i, m in enumerate(names)}  # b: earlier ones
    for agent, values in (("a", up), ("b", down)):
        s.add_score(1, result(agent, 4, "score"), {"scores": memoryview(score_blob(s, values))})
    s.finish_score(1)
    views = {"a": view("a", 1000.0), "b": view("b", 1000.0)}
    s.plan(1, "train", views)
    a1, b1 = s.plans[1]["a"].ranks, s.plans[1]["b"].ranks
    assert set(a1) == set(names[8:]) and set(b1) == set(names[:6])
    assert a1[names[13]] >= a1[names[8]] and b1[names[0]] >= b1[names[5]]  # ranks by importance
    details = s.agent_details(1)["a"]
    assert (
        details["matrices"] == "6" and details["rank"] == f"{min(a1.values())}-{max(a1.values())}"
    )
    # a's adapters: names[8] turns out to matter least by far
    sens_a = {m: (0.0 if m == names[8] else 1.0) for m in a1}
    states = train_round(s, 1, {"a": sens_a, "b": dict.fromkeys(b1, 1.0)})
    # modules only one agent trains are that agent's ΔW (the mean over those that trained it)
    m = names[13]
    a_key, b_key = fm.keys(m)
    want = fm.delta(states["a"][a_key], states["a"][b_key], SCALE)
    got = fm.delta(*s.global_ab[m], SCALE)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    s.plan(2, "train", views)  # not a selection round: same matrices, ranks from training
    a2 = s.plans[2]["a"].ranks
    assert set(a2) == set(a1) and a2[names[8]] == 1
    s.plan(3, "train", views)  # a selection round: names[8] leaves, names[7] comes in
    a3 = s.plans[3]["a"].ranks
    assert names[8] not in a3 and names[7] in a3 and len(a3) == 6
    assert set(s.plans[3]["b"].ranks) == set(names[:6])
    # names[7] was never adapted: a's task starts it from the seeded init (B = 0)
    payload = payloads.decode(s.assign(3, "a", "train").blobs["global"]).tensors
    a_key, b_key = fm.keys(names[7])
    assert float(payload[b_key].abs().max()) == 0.0 and payload[a_key].shape[0] == a3[names[7]]
    tensors, meta = s.state()  # importance, layouts and fits survive a checkpoint
    other = server(tiny_model_dir, None)
    other.restore(tensors, meta)
    assert other.importance.of("a", names) == pytest.approx(s.importance.of("a", names))
    assert set(other.layouts["a"].modules) == set(s.layouts["a"].modules)


def test_sensitivity_with_the_wrong_names_is_rejected(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir)
    s.plan(1, "train", {"a": view("a", 1000.0)})
    ranks = s.plans[1]["a"].ranks
    blobs = blob(random_update(s, dict(ranks), 0), 1)
    blobs["sensitivity"] = sens_blob({next(iter(s.candidates.keys() - ranks.keys())): 1.0}, 1)
    with pytest.raises(UpdateRejected):
        s.validate(1, result("a", 4), blobs)


def test_random_selection_is_seeded_per_agent_and_selection(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir, select={"count": 6, "mode": "random", "seed": 3})
    views = {"a": view("a", 1000.0), "b": view("b", 1000.0)}
    sets = []
    for round in (1, 3, 5):
        s.plan(round, "train", views)
        sets += [frozenset(s.plans[round][a].ranks) for a in views]
    assert all(len(x) == 6 for x in sets) and len(set(sets)) > 1
    assert any(x != frozenset(s.selected) for x in sets)  # not the importance top set


def test_fixed_ranks_with_no_spread(tiny_model_dir: Path) -> None:
    s = selected_server(tiny_model_dir, plan={"ranks": [4], "batch_sizes": [2], "rank_spread": 0})
    s.plan(1, "train", {"a": view("a", 1000.0), "b": view("b", 0.01)})
    assert all(set(p.ranks.values()) == {4} for p in s.plans[1].values())


@pytest.mark.parametrize("fit_memory", [True, False])
def test_each_agents_time_and_memory_constants_come_from_its_rounds(
    tiny_model_dir: Path, fit_memory: bool
) -> None:
    plan = {"ranks": [1, 2, 4, 8], "batch_sizes": [1, 2], "capacity": 0.0}
    s = selected_server(tiny_model_dir, plan=plan | {"fit_memory": fit_memory})
    views = {"a": view("a", 1000.0)}
    s.plan(1, "train", views)
    p1 = s.plans[1]["a"]
    assert p1.overhead_s > 0 and p1.flop_s > 0
    seconds = 3.0 * p1.compute_s
    train_round(s, 1, {}, seconds=seconds, memory_peak=2.0 * p1.memory_bytes)
    assert s.planner.time_fit["a"] == pytest.approx((3.0, 3.0), rel=1e-6)
    s.plan(2, "train", views)
    p2 = s.plans[2]["a"]
    assert p2.compute_s == pytest.approx(p2.steps * 3.0 * (p2.overhead_s + p2.flop_s))
    resources = s.planner.resources(s.params, profile(), views["a"], s.tokens)
    assert resources.memory_factor == (pytest.approx(2.0) if fit_memory else 1.0)
