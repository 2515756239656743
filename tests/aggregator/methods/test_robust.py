"""Robust aggregation and poisoned updates: the rules hold where plain FedAvg breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_harness import NAMES, Harness, lora_state, start_round

from aggregator.methods.robust import clip_lora, lora_delta_norm
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


def aggregate(tmp_path: Path, rule: str, attackers: int, **extra: object) -> torch.Tensor:
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
        rule: float((aggregate(tmp_path / rule, rule, 2, trim=0.3) - clean).abs().max())
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
    unclipped = aggregate(tmp_path / "plain", "fedavg", 1)
    assert float((unclipped - clean).abs().max()) > 1e4


def test_wrong_shape_and_absurd_example_counts_are_rejected(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=3)
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
