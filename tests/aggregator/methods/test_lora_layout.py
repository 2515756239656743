"""The layout of an update follows from the task, never from the first sender (issue 24).

An agent that answers round 1 first with a one-module LoRA once fixed the round's layout: every
honest update was rejected and its adapter became the global. Now, with the base model at hand
the layout is exact from its headers (the odd update is rejected); without it, names and ranks
are checked against the task and the layout most agents sent wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from engine_harness import Harness, fake_model_dir, start_round

from aggregator.errors import UpdateRejected
from aggregator.methods.lora_layout import check_task_layout, expected_layout
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply
from protocol.methods._common import LoraParams

P = "base_model.model.model.layers.0.self_attn."
LORA: dict[str, Any] = {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj"]}}
HONEST_SHAPES = {
    P + "q_proj.lora_A.weight": (4, 16),
    P + "q_proj.lora_B.weight": (16, 4),
    P + "k_proj.lora_A.weight": (4, 16),
    P + "k_proj.lora_B.weight": (8, 4),
}


def state(value: float, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {n: torch.full(s, value) for n, s in shapes.items()}


ONE_MODULE = {k: v for k, v in HONEST_SHAPES.items() if "q_proj" in k}


def run_round(h: Harness) -> list[Any]:
    tasks = start_round(h, ["evil", "a1", "a2", "a3"])
    replies = [h.result(tasks["evil"], "evil", 1000, state(1e3, ONE_MODULE))[0].header]
    for agent in ("a1", "a2", "a3"):
        replies.append(h.result(tasks[agent], agent, 10, state(0.5, HONEST_SHAPES))[0].header)
    h.tick()
    assert h.engine.round == 1
    return replies


def test_without_a_model_the_first_sender_does_not_own_round_1(tmp_path: Path) -> None:
    h = Harness(tmp_path, method=LORA, min_agents=4)
    try:
        replies = run_round(h)
        assert [r.type for r in replies] == ["ack"] * 4  # nothing to refuse on receipt...
        tensors, _, _ = h.store.load(1)
        assert set(tensors) == set(HONEST_SHAPES)  # ...but the honest majority's layout won
        for name, value in tensors.items():
            torch.testing.assert_close(value, torch.full(HONEST_SHAPES[name], 0.5))
        assert h.summaries[-1].method["layout_left_out"] == 1.0
    finally:
        h.close()


def test_with_the_model_the_layout_is_exact_and_the_odd_update_is_rejected(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, method=LORA, min_agents=4, model_dir=fake_model_dir(tmp_path / "m"))
    try:
        replies = run_round(h)
        assert isinstance(replies[0], ErrorReply)
        assert replies[0].code == ErrorCode.REJECTED_UPDATE
        assert [r.type for r in replies[1:]] == ["ack"] * 3
        tensors, _, _ = h.store.load(1)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == HONEST_SHAPES
    finally:
        h.close()


def test_layout_is_derived_from_model_targets_and_rank(tmp_path: Path) -> None:
    lora = LoraParams(r=4, target_modules=("q_proj", "k_proj"), rank_pattern={"k_proj": 2})
    layout = expected_layout(fake_model_dir(tmp_path), lora)
    assert layout == {**HONEST_SHAPES, P + "k_proj.lora_A.weight": (2, 16),
                      P + "k_proj.lora_B.weight": (8, 2)}  # fmt: skip


def test_names_and_ranks_are_checked_against_the_task_without_a_model() -> None:
    lora = LoraParams(r=4, target_modules=("q_proj", "k_proj"))
    check_task_layout(state(0.0, HONEST_SHAPES), lora)  # the control: the task's layout passes
    wrong_rank = {P + "q_proj.lora_A.weight": (2, 16), P + "q_proj.lora_B.weight": (16, 2)}
    not_target = {P + "o_proj.lora_A.weight": (4, 16), P + "o_proj.lora_B.weight": (16, 4)}
    unpaired = {P + "q_proj.lora_A.weight": (4, 16)}
    other = {"model.embed_tokens.weight": (32, 16)}
    for shapes in (wrong_rank, not_target, unpaired, other):
        try:
            check_task_layout(state(0.0, shapes), lora)
        except UpdateRejected as exc:
            assert exc.code == ErrorCode.PAYLOAD_MISMATCH
        else:
            raise AssertionError(f"accepted {sorted(shapes)}")


def test_without_a_model_a_one_to_one_split_applies_neither_layout(tmp_path: Path) -> None:
    """Two agents, one honest, one sending the honest layout plus a made-up module of the
    right rank: no layout has more agents, so neither is applied (before, the tie went to the
    layout with more tensors: the liar's adapter became the global and the honest layout was
    rejected from round 2 on); the next round votes again."""
    from engine_harness import NAMES, assigns, lora_state

    h = Harness(tmp_path, rounds=3)  # no model_dir
    for a in ("honest", "liar"):
        h.hello(a)
    t = assigns(h.tick())
    evil = {k: torch.full_like(v, 3.0) for k, v in lora_state(0.5).items()}
    extra = "base_model.model.model.layers.1.self_attn.q_proj"
    evil[f"{extra}.lora_A.weight"] = torch.full((4, 16), 3.0)
    evil[f"{extra}.lora_B.weight"] = torch.full((16, 4), 3.0)
    h.result(t["honest"], "honest", 100, lora_state(0.5))
    h.result(t["liar"], "liar", 1, evil)
    out = h.tick()
    assert h.method.global_state == {}
    assert h.summaries[-1].method["layout_left_out"] == 2.0
    t2 = assigns(out) or assigns(h.tick())
    h.result(t2["honest"], "honest", 100, lora_state(0.5))
    h.result(t2["liar"], "liar", 1, lora_state(0.7))  # the liar gives up: both agree
    h.tick()
    assert set(h.method.global_state) == set(NAMES)
    h.close()
