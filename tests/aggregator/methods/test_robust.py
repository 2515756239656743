"""Robust aggregation and poisoned updates: the rules hold where plain FedAvg breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_harness import NAMES, Harness, fake_model_dir, lora_state, start_round

from aggregator.methods import robust
from aggregator.methods.robust import (
    clip_lora,
    lora_delta_bound,
    lora_delta_norm,
    lora_square_bound,
)
from protocol._payload_checks import square_sums
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply

AGENTS = ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]


def honest(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in lora_state(1.0).items()}


def explicit_norm(update: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None) -> float:
    a, b = update[NAMES[0]].double(), update[NAMES[1]].double()
    delta = b @ a
    if base is not None:
        delta = delta - base[NAMES[1]].double() @ base[NAMES[0]].double()
    return float(delta.norm())


def test_delta_norm_is_the_norm_of_b_times_a() -> None:
    u, base = honest(1), honest(2)
    assert lora_delta_norm(u, base) == pytest.approx(explicit_norm(u, base), rel=1e-9)
    assert lora_delta_norm(u, None) == pytest.approx(explicit_norm(u, None), rel=1e-9)


@pytest.mark.parametrize("with_base", [True, False])
def test_clipping_hits_the_bound_exactly(with_base: bool) -> None:
    base = honest(2) if with_base else None
    big = {n: t * 50 for n, t in honest(3).items()}
    norm = lora_delta_norm(big, base)
    clipped, s = clip_lora(big, base, norm / 10)
    assert 0 < s < 1
    assert explicit_norm(clipped, base) == pytest.approx(norm / 10, rel=1e-6)
    small, s1 = clip_lora(big, base, norm * 2)
    assert s1 == 1.0 and all(torch.equal(small[n], big[n]) for n in big)


def many_modules(seed: int, scale: float, modules: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(modules):
        p = f"base_model.model.model.layers.{m}.self_attn.q_proj"
        out[f"{p}.lora_A.weight"] = torch.randn(4, 24, generator=g) * scale
        out[f"{p}.lora_B.weight"] = torch.randn(24, 4, generator=g) * scale
    return out


@pytest.mark.parametrize("seed", range(8))
def test_the_cheap_bound_is_never_below_the_exact_norm(seed: int) -> None:
    update, base = many_modules(seed, 1.0), many_modules(seed + 100, 1.0)
    near = {k: v + 1e-3 * many_modules(seed + 200, 1.0)[k] for k, v in base.items()}
    for u, b in ((update, base), (update, None), (near, base)):
        exact = lora_delta_norm(u, b)
        assert lora_delta_bound(u, b) >= exact > 0
    # and it is a usable bound: within a small factor for an update near its base
    assert lora_delta_bound(near, base) < 20 * lora_delta_norm(near, base)


@pytest.mark.parametrize("seed", range(8))
def test_the_square_sum_bound_is_never_below_the_exact_norm(seed: int) -> None:
    update, base = many_modules(seed, 1.0), many_modules(seed + 100, 1.0)
    near = {k: v + 1e-3 * many_modules(seed + 200, 1.0)[k] for k, v in base.items()}
    tiny = many_modules(seed, 1e-25)  # squares below float32's normal range
    for u, b in ((update, base), (update, None), (near, base), (tiny, None), (tiny, base)):
        exact = lora_delta_norm(u, b)
        sums, base_sums = square_sums(u), None if b is None else square_sums(b)
        assert lora_square_bound(u, b, sums, base_sums) >= lora_delta_bound(u, b) * (1 - 1e-6)
        assert lora_square_bound(u, b, sums, base_sums) >= exact
    # a factor whose squares overflow float32 has no such bound
    huge = update | {NAMES_6[0]: update[NAMES_6[0]] * 1e25}
    assert lora_square_bound(huge, None, square_sums(huge)) == float("inf")


NAMES_6 = [f"base_model.model.model.layers.{m}.self_attn.q_proj.lora_B.weight" for m in range(6)]


def test_an_update_inside_the_square_sum_bound_costs_no_pass_over_its_factors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    update, base = many_modules(1, 1.0), many_modules(2, 1.0)
    sums, base_sums = square_sums(update), square_sums(base)
    bound = lora_square_bound(update, base, sums, base_sums)

    def refused(*args: object, **kwargs: object) -> float:
        raise AssertionError("a pass over the factors")

    monkeypatch.setattr(robust, "lora_delta_bound", refused)
    monkeypatch.setattr(robust, "lora_delta_norm", refused)
    monkeypatch.setattr(robust, "square_sums", refused)
    same, s = clip_lora(update, base, bound * 1.01, sums, base_sums)
    assert s == 1.0 and all(torch.equal(same[k], update[k]) for k in update)


def test_the_exact_norm_is_computed_only_when_the_bound_exceeds_the_clip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[float] = []
    exact = robust.lora_delta_norm

    def counted(update: object, base: object, s: float = 1.0) -> float:
        calls.append(s)
        return exact(update, base, s)  # type: ignore[arg-type]

    monkeypatch.setattr(robust, "lora_delta_norm", counted)
    update, base = many_modules(1, 1.0), many_modules(2, 1.0)
    bound, norm = lora_delta_bound(update, base), exact(update, base)
    same, s = clip_lora(update, base, bound * 1.01)  # inside the bound: no exact norm
    assert s == 1.0 and calls == [] and all(torch.equal(same[k], update[k]) for k in update)
    if norm < bound * 0.99:  # between the exact norm and the bound: exact norm, no clip
        same, s = clip_lora(update, base, (norm + bound) / 2)
        assert s == 1.0 and calls == [1.0]
    calls.clear()
    clipped, s = clip_lora(update, base, norm / 3)  # outside: exact norm and bisection
    assert 0 < s < 1 and len(calls) > 1
    assert exact(clipped, base) == pytest.approx(norm / 3, rel=1e-6)


def aggregate(tmp_path: Path, rule: str, attackers: int, **extra: object) -> torch.Tensor:
    extra.setdefault("clip_norm", 0)  # clean runs: the synthetic updates exceed the default
    h = Harness(tmp_path, method={"aggregation": {"rule": rule, **extra}}, min_agents=len(AGENTS))
    try:
        tasks = start_round(h, AGENTS)
        for i, agent in enumerate(AGENTS):
            poisoned = i >= len(AGENTS) - attackers
            state = {n: t * 1e6 for n, t in honest(i).items()} if poisoned else honest(i)
            h.result(tasks[agent], agent, 10, state)
        h.tick()
        tensors, _, _ = h.store.load(1)
        for t in tensors.values():
            assert torch.isfinite(t).all()
        return tensors[NAMES[1]]
    finally:
        h.close()


def test_robust_rules_resist_what_breaks_fedavg(tmp_path: Path) -> None:
    clean = aggregate(tmp_path / "clean", "fedavg", 0)
    errors = {
        rule: float(
            (aggregate(tmp_path / rule, rule, 2, trim=0.3, clip_norm=0) - clean).abs().max()
        )
        for rule in ("fedavg", "median", "trimmed_mean")
    }
    assert errors["fedavg"] > 1e5  # two attackers of seven wreck the plain mean
    assert errors["median"] < 0.05
    assert errors["trimmed_mean"] < 0.05


def test_clip_norm_bounds_an_attackers_pull(tmp_path: Path) -> None:
    clean = aggregate(tmp_path / "clean", "fedavg", 0)
    bound = lora_delta_norm(honest(0), None) * 1.5
    clipped = aggregate(tmp_path / "clip", "fedavg", 1, clip_norm=bound)
    assert float((clipped - clean).abs().max()) < 1.0
    unclipped = aggregate(tmp_path / "plain", "fedavg", 1, clip_norm=0)
    assert float((unclipped - clean).abs().max()) > 1e4


def test_wrong_shape_and_absurd_example_counts_are_rejected(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=3, model_dir=fake_model_dir(tmp_path / "model"))
    try:
        tasks = start_round(h, ["a1", "a2", "a3"])
        assert h.result(tasks["a1"], "a1", 10, honest(1))[0].header.type == "ack"
        wrong = {NAMES[0]: torch.ones(4, 17), NAMES[1]: torch.ones(16, 4)}  # in-features 17
        reply = h.result(tasks["a2"], "a2", 10, wrong)[0].header
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.REJECTED_UPDATE
        reply = h.result(tasks["a3"], "a3", 10**8, honest(3))[0].header
        assert isinstance(reply, ErrorReply) and "example count" in reply.reason
        h.tick()
        tensors, _, _ = h.store.load(1)
        torch.testing.assert_close(tensors[NAMES[0]], honest(1)[NAMES[0]])
        assert len(h.ledger.rejections("run-t", 1)) == 2
    finally:
        h.close()


def test_by_default_one_agent_cannot_take_over_the_mean(tmp_path: Path) -> None:
    """Issue 24 (7): one agent claiming 10^7 examples with values of 1e30 once moved the
    global's largest value to 1e30. The default bound and weight cap keep it near the clean
    aggregate's scale."""
    scale = 0.05  # honest updates well inside the default ΔW bound

    def run(attacker: bool, path: Path, aggregation: dict[str, object]) -> torch.Tensor:
        h = Harness(path, method={"aggregation": aggregation}, min_agents=len(AGENTS))
        try:
            tasks = start_round(h, AGENTS)
            for i, agent in enumerate(AGENTS):
                state = {n: t * scale for n, t in honest(i).items()}
                n = 100
                if attacker and i == 0:
                    state, n = {k: torch.full_like(t, 1e30) for k, t in state.items()}, 10**7
                h.result(tasks[agent], agent, n, state)
            h.tick()
            return h.store.load(1)[0][NAMES[1]]
        finally:
            h.close()

    clean = run(False, tmp_path / "clean", {})
    attacked = run(True, tmp_path / "attacked", {})  # the defaults
    assert torch.isfinite(attacked).all()
    assert float(attacked.abs().max()) < 100 * float(clean.abs().max())
    undefended = run(True, tmp_path / "off", {"clip_norm": 0, "max_weight": 10**9})
    assert float(undefended.abs().max()) > 1e20  # the control: without them, it owns the mean


def fedit_update(layers: int = 12, r: int = 8, hidden: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    state = {}
    for layer in range(layers):
        p = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        state[f"{p}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.01
        state[f"{p}.lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.01
    return state


def fedit_validate(state: dict[str, torch.Tensor], poke: tuple[str, int, float] | None) -> object:
    """fedit's validate (default clip) of ``state`` as a payload, one value patched in."""
    import math
    import struct

    from aggregator.methods.fedit.server import FeditServer
    from protocol import payloads
    from protocol.messages import TaskResult

    server = FeditServer({"lora": {"r": 8, "target_modules": ["q_proj"]}})
    server.begin_round(1)
    data = payloads.encode_lora(state, method="fedit", round=1)
    if poke is not None:
        name, index, value = poke
        state = {k: v.clone() for k, v in state.items()}
        state[name].view(-1)[index] = 1234.5
        data = payloads.encode_lora(state, method="fedit", round=1)
        mark = struct.pack("<f", 1234.5)
        assert data.count(mark) == 1 and math.isfinite(1234.5)
        data = data.replace(mark, struct.pack("<f", value))
    result = TaskResult(run_id="r", round=1, task_id="t", agent_id="a", method="fedit",
                        num_examples=3, metrics={})  # fmt: skip
    return server.validate(1, result, {"update": memoryview(data)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fedit_refuses_one_bad_value_in_the_middle_of_an_update(bad: float) -> None:
    from aggregator.errors import UpdateRejected

    name = "base_model.model.model.layers.6.self_attn.q_proj.lora_A.weight"
    with pytest.raises(UpdateRejected, match=f"'{name}' holds NaN or infinite") as info:
        fedit_validate(fedit_update(), (name, 300, bad))
    assert info.value.code is ErrorCode.NOT_FINITE


def test_fedit_clips_an_update_with_one_huge_value_instead_of_letting_it_through() -> None:
    """1e30 is finite, so no finite check refuses it; its squares overflow float32, so the
    cheapest bound gives up and the exact ΔW norm (float64) pulls the update in (the bisection
    over 40 halvings ends at s = 0 for a pull this large: B becomes 0)."""
    from protocol.methods._common import DEFAULT_CLIP_NORM

    name = "base_model.model.model.layers.6.self_attn.q_proj.lora_B.weight"
    update = fedit_validate(fedit_update(), (name, 100, 1e30))
    assert update.metrics["clip_scale"] < 1e-9  # type: ignore[attr-defined]
    assert lora_delta_norm(update.tensors, None) <= DEFAULT_CLIP_NORM  # type: ignore[attr-defined]
    honest_update = fedit_validate(fedit_update(), None)
    assert honest_update.metrics["clip_scale"] == 1.0  # type: ignore[attr-defined]


def test_fedit_bounds_an_update_against_the_global_state_it_holds_now() -> None:
    """The global adapter's sums of squares are kept between updates: a new global state (a
    round's mean, a restore) must not be bounded with the old one's."""
    from aggregator.methods.fedit.server import FeditServer
    from protocol import payloads
    from protocol.messages import TaskResult

    server = FeditServer({"lora": {"r": 8, "target_modules": ["q_proj"]}})
    update = fedit_update()
    result = TaskResult(run_id="r", round=2, task_id="t", agent_id="a", method="fedit",
                        num_examples=3, metrics={})  # fmt: skip
    blob = {"update": memoryview(payloads.encode_lora(update, method="fedit", round=2))}
    server.global_state = {k: v * 0.5 for k, v in update.items()}
    server.begin_round(2)
    assert server.validate(2, result, blob).metrics["clip_scale"] == 1.0
    server.global_state = {k: v * 1e4 for k, v in update.items()}  # ΔW now far past the clip
    clipped = server.validate(2, result, blob)
    assert clipped.metrics["clip_scale"] < 1.0
    assert lora_delta_norm(clipped.tensors, server.global_state) <= 1000.0 * (1 + 1e-6)


@pytest.mark.parametrize("huge", [False, True])
def test_fedit_never_writes_to_the_received_update(huge: bool) -> None:
    """fedit decodes an update without a copy: its tensors are views of the received blob,
    which the update log writes after validate (its sha256 must still hold)."""
    import hashlib

    from aggregator.methods.fedit.server import FeditServer
    from protocol import payloads
    from protocol.messages import TaskResult

    state = fedit_update()
    if huge:  # clipped: the clip makes new tensors
        state[NAMES_6[0].replace("lora_B", "lora_A")] *= 1e6
    server = FeditServer({"lora": {"r": 8, "target_modules": ["q_proj"]}})
    server.begin_round(1)
    blob = bytearray(payloads.encode_lora(state, method="fedit", round=1))
    digest = hashlib.sha256(blob).hexdigest()
    result = TaskResult(run_id="r", round=1, task_id="t", agent_id="a", method="fedit",
                        num_examples=3, metrics={})  # fmt: skip
    update = server.validate(1, result, {"update": memoryview(blob)})
    assert (update.metrics["clip_scale"] < 1.0) == huge
    server.add(update)
    server.finish_round(1)
    assert hashlib.sha256(blob).hexdigest() == digest
    if not huge:  # no copy was made: the update's tensors are views of the blob
        t = next(iter(update.tensors.values()))
        base = np_address(blob)
        assert base <= t.data_ptr() < base + len(blob)


def np_address(buffer: bytearray) -> int:
    import numpy as np

    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def test_fedit_checks_a_layout_once_and_still_refuses_a_wrong_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aggregator.errors import UpdateRejected
    from aggregator.methods.fedit import server as fedit_server
    from protocol import payloads
    from protocol.messages import TaskResult

    calls: list[int] = []
    real = fedit_server.check_task_layout
    monkeypatch.setattr(
        fedit_server, "check_task_layout", lambda t, lora: (calls.append(1), real(t, lora))[1]
    )
    server = fedit_server.FeditServer({"lora": {"r": 8, "target_modules": ["q_proj"]}})
    server.begin_round(1)
    result = TaskResult(run_id="r", round=1, task_id="t", agent_id="a", method="fedit",
                        num_examples=3, metrics={})  # fmt: skip

    def blob(state: dict[str, torch.Tensor]) -> dict[str, memoryview]:
        return {"update": memoryview(payloads.encode_lora(state, method="fedit", round=1))}

    for _ in range(3):
        server.validate(1, result, blob(fedit_update()))
    assert calls == [1]  # one check for three updates of one layout
    wrong = fedit_update(r=4)  # not the task's rank
    for _ in range(2):  # a refused layout is checked (and refused) every time
        with pytest.raises(UpdateRejected, match="rank is not the task's 8"):
            server.validate(1, result, blob(wrong))
    assert calls == [1, 1, 1]
