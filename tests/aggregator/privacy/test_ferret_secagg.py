"""Ferret under secure aggregation, through the real round engine in-process: agents mask the
dense (group, seed) coefficient grid, the server unmasks only the sum and rebuilds the step
from it; the global equals the plain run's within the fixed-point error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from edge_agent.model.store import ResolvedModel
from edge_agent.training.data import Example
from protocol.secagg.fixedpoint import sum_error_bound
from tests.helpers.ferret_harness import FerretHarness

PARAMS: dict[str, Any] = {"train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32}}
DATA = {
    "a": [Example("Capital of France?", "Paris"), Example("Say hello.", "hello hello")],
    "b": [Example("Two plus two?", "four"), Example("Capital of Italy?", "Rome")] * 2,
    "c": [Example("Colour of the sky?", "blue"), Example("Opposite of up?", "down")],
    "d": [Example("Capital of Spain?", "Madrid")] * 3,
}
SECURE = {"secure_aggregation": True, "secagg": {"degree": 2, "min_survivors": 2}}


def run(
    state: Path,
    model_dir: Path,
    resolved: ResolvedModel,
    *,
    ferret: dict[str, Any],
    privacy: dict[str, Any] | None = None,
    agents: str = "abc",
    fail: dict[str, str] | None = None,
    rounds: int = 2,
) -> FerretHarness:
    h = FerretHarness(
        state,
        model_dir,
        resolved,
        {a: DATA[a] for a in agents},
        params={**PARAMS, "ferret": ferret},
        rounds=rounds,
        run_id=f"run-{state.name}",
        privacy=privacy,
    )
    h.fail = fail or {}
    h.run()
    return h


def assert_same_steps(plain: FerretHarness, secure: FerretHarness, rounds: list[int]) -> None:
    """Round 1's coefficients within the fixed-point bound; later rounds train from a global
    that already differs by that much, so their coefficients agree to a relative 1e-5."""
    bound = sum_error_bound(3, 24) + 2.0**-22  # the fixed point, then one float32 rounding
    for r in rounds:
        pg, ps, pv = plain.method.history[r]
        sg, ss, sv = secure.method.history[r]
        assert torch.equal(pg, sg) and torch.equal(ps, ss), r  # the same (group, seed) terms
        if r == 1:
            assert float((pv - sv).abs().max()) <= bound
        else:
            torch.testing.assert_close(sv, pv, rtol=1e-5, atol=1e-6)


def test_a_secure_ferret_run_gives_the_plain_global(
    tmp_path: Path, tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    ferret = {"k": 6}
    plain = run(tmp_path / "plain", tiny_model_dir, tiny_resolved, ferret=ferret)
    secure = run(tmp_path / "secure", tiny_model_dir, tiny_resolved, ferret=ferret, privacy=SECURE)
    try:
        assert_same_steps(plain, secure, [1, 2])
        for name, value in plain.method.weights.items():
            torch.testing.assert_close(secure.method.weights[name], value, rtol=1e-4, atol=1e-6)
        moved = [
            not torch.equal(v, plain.method.weights[n]) for n, v in secure.method.weights.items()
        ]
        assert any(moved) or all(  # fixed point moved something, unless every γ was exact
            torch.equal(plain.method.history[r][2], secure.method.history[r][2]) for r in (1, 2)
        )
        for r in (1, 2):
            rows = secure.ledger.updates("run-secure", r)
            assert sorted(u.agent_id for u in rows) == ["a", "b", "c"]
            assert all(u.blob_path is None and u.sha256 == "" for u in rows)  # nothing individual
        assert secure.summaries[-1].method["secagg_survivors"] == 3
        # the agents rebuilt the same step from the broadcast coefficients, bit for bit
        held = secure.workspaces["a"].cache["ferret"]
        assert held.round == 1  # it trained round 2 from round 1 and was not sent round 2 yet
    finally:
        plain.close()
        secure.close()


def test_agents_clamp_their_coefficients_as_the_plain_server_does(
    tmp_path: Path, tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    ferret = {"k": 6, "clip_norm": 0.05}  # below most coefficients of this tiny model
    plain = run(tmp_path / "plain", tiny_model_dir, tiny_resolved, ferret=ferret, rounds=1)
    secure = run(
        tmp_path / "secure", tiny_model_dir, tiny_resolved, ferret=ferret, privacy=SECURE, rounds=1
    )
    try:
        assert_same_steps(plain, secure, [1])
        assert float(secure.method.history[1][2].abs().max()) <= float(torch.tensor(0.05))
        rows = secure.ledger.updates("run-secure", 1)
        assert all(u.metrics.get("clipped_coefficients", 0) > 0 for u in rows)
    finally:
        plain.close()
        secure.close()


def test_an_agent_that_dies_after_sharing_leaves_the_others_mean(
    tmp_path: Path, tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    ferret = {"k": 6}
    # an agent's draws depend on the run seed, the round and its id, not on who else is in
    plain = run(tmp_path / "plain", tiny_model_dir, tiny_resolved, ferret=ferret, rounds=1)
    # four agents, each with the other three as neighbours; two shares unmask a secret
    secagg = {"degree": 4, "min_survivors": 2, "threshold_ratio": 0.51}
    secure = run(
        tmp_path / "secure",
        tiny_model_dir,
        tiny_resolved,
        ferret=ferret,
        privacy={"secure_aggregation": True, "secagg": secagg},
        agents="abcd",
        fail={"d": "mask"},
        rounds=1,
    )
    try:
        assert secure.summaries[0].method["secagg_survivors"] == 3
        assert_same_steps(plain, secure, [1])
    finally:
        plain.close()
        secure.close()


def test_what_a_masked_result_still_shows_is_checked(tiny_model_dir: Path) -> None:
    from aggregator.errors import UpdateRejected
    from aggregator.methods import MethodContext
    from aggregator.methods.ferret.server import FerretServer
    from protocol.messages import TaskResult

    server = FerretServer({"ferret": {"k": 6}}, MethodContext(model_dir=tiny_model_dir))

    def result(n: int, **metrics: float) -> TaskResult:
        return TaskResult(
            run_id="r", round=3, task_id="t", agent_id="a", method="ferret",
            num_examples=n, metrics=metrics,
        )  # fmt: skip

    server.check_masked(3, result(4, held_round=2.0))
    with pytest.raises(UpdateRejected, match="trained from global round 1"):
        server.check_masked(3, result(4, held_round=1.0))
    with pytest.raises(UpdateRejected, match="out-of-sync result carries no update"):
        server.check_masked(3, result(4, held_round=1.0, out_of_sync=1.0))
    server.check_masked(3, result(0, held_round=1.0, out_of_sync=1.0))
    assert server._held["a"] == 1  # resynced from round 1 next time
    layout = server.secure_layout(3)
    assert layout.entries == [("coef", (server.n_groups, 6))]
