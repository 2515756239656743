"""Ferret client half on a tiny random Llama: SGD, projection, catch-up, resync, refusals."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer
from edge_agent.errors import TaskError
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.ferret.client import (
    CACHE_KEY,
    FerretClient,
    HeldModel,
    choice_rng,
    sgd_seed,
    sgd_steps,
)
from edge_agent.model import files as model_files
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example, collate, tokenize
from protocol import payloads, randomness
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params
from protocol.methods.ferret import math as fm
from protocol.methods.ferret import spec

TRAIN = [
    Example("Capital of France?", "Paris"),
    Example("Capital of Italy?", "Rome"),
    Example("Say hello.", "hello hello"),
    Example("Two plus two?", "four"),
]
EVAL = [Example("Capital of Spain?", "Madrid"), Example("Say bye.", "bye bye")]
PARAMS: dict[str, Any] = {
    "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32},
    "eval": {"max_len": 32, "batch_size": 2, "max_new_tokens": 2},
    "ferret": {"k": 6},
}


class TinyWorkspace:
    def __init__(self, resolved: ResolvedModel) -> None:
        self.resolved = resolved
        self.quants: list[str] = []
        self._bases: dict[str, tuple[Any, Any]] = {}
        self._cache: dict[str, Any] = {}

    @property
    def train_examples(self) -> list[Example]:
        return TRAIN

    @property
    def eval_examples(self) -> list[Example]:
        return EVAL

    @property
    def progress(self) -> bool:
        return False

    @property
    def cache(self) -> dict[str, Any]:
        return self._cache

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        assert model.sha256 == self.resolved.sha256
        self.quants.append(quant)
        if quant not in self._bases:
            self._bases[quant] = load_base(self.resolved, quant, device="cpu")  # type: ignore[arg-type]
        return self._bases[quant]

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


def run_task(
    ws: TinyWorkspace,
    kind: str,
    round: int,
    params: Mapping[str, Any],
    blobs: Mapping[str, bytes] | None = None,
    quant: str = "nf4",
) -> TaskOutput:
    assign = TaskAssign(
        run_id="run-1",
        round=round,
        task_id=f"r{round}-{kind}-a",
        kind=kind,  # type: ignore[arg-type]
        method="ferret",
        model=BaseModelRef(name="tiny", sha256=ws.resolved.sha256),
        quant=quant,  # type: ignore[arg-type]
        params=dict(params),
        deadline_s=60.0,
    )
    views = {k: memoryview(v) for k, v in (blobs or {}).items()}
    task = TaskInput(assign=assign, params=parse_params("ferret", params), blobs=views)
    return FerretClient().run(task, ws)


@pytest.fixture(scope="module")
def ws(tiny_resolved: ResolvedModel) -> TinyWorkspace:
    return TinyWorkspace(tiny_resolved)


def held(ws: TinyWorkspace) -> HeldModel:
    h = ws.cache[CACHE_KEY]
    assert isinstance(h, HeldModel)
    return h


def test_sgd_step_is_minus_lr_times_the_gradient(ws: TinyWorkspace) -> None:
    model, tokenizer = ws.base(BaseModelRef(name="t", sha256=ws.resolved.sha256), "fp32")
    model = copy.deepcopy(model).requires_grad_(True)
    t = spec.Params.model_validate({"train": {"steps": 1, "batch_size": 4, "lr": 0.1}}).train
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, att, labels = collate(
        tokenize(TRAIN, tokenizer, 128), tokenizer.pad_token_id, torch.device("cpu"), left=False
    )
    model.zero_grad()
    model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))  # grad_clip = 1.0
    model.zero_grad()
    losses = sgd_steps(model, tokenizer, TRAIN, t, seed=0)
    assert len(losses) == 1
    q = "model.layers.0.self_attn.q_proj.weight"
    delta = dict(model.named_parameters())[q].detach() - before[q]
    torch.testing.assert_close(delta, -0.1 * scale * grads[q], rtol=1e-4, atol=1e-7)


def test_train_task_sends_triples_and_keeps_the_global_model(ws: TinyWorkspace) -> None:
    out = run_task(ws, "train", 1, PARAMS)
    h = held(ws)
    assert ws.quants[-1] == "fp32"  # the task said nf4: Ferret trains the unquantized base
    base, _ = ws.base(BaseModelRef(name="t", sha256=ws.resolved.sha256), "fp32")
    for name, p in base.named_parameters():  # back at the global (= base) model, bit for bit
        assert torch.equal(h.tensors[name], p.data)
    assert h.round == 0 and out.num_examples == len(TRAIN)
    assert out.metrics[spec.HELD_ROUND] == 0.0 and out.metrics["steps"] == 2.0
    p = payloads.decode(
        out.blobs[spec.UPDATE_BLOB],
        payloads.Expect(
            kind=payloads.PayloadKind.SEEDCOEF,
            round=1,
            base_seed=fm.pool_base_seed(0),
            k=6,
            n_groups=len(h.layout.groups),
        ),
    )
    groups = p.tensors["group"].tolist()
    counts = [groups.count(g) for g in range(len(h.layout.groups))]
    assert min(counts) >= 2 and max(counts) == 6  # the largest update gets all K seeds
    assert len(out.blobs[spec.UPDATE_BLOB]) == 12 * len(groups) + p.header_nbytes
    assert out.metrics["triples"] == len(groups)


def test_eval_applies_the_steps_it_is_sent_and_resyncs_when_it_cannot(
    ws: TinyWorkspace, tiny_model_dir: Path
) -> None:
    ws.cache.clear()
    server = FerretServer(PARAMS, MethodContext(model_dir=tiny_model_dir))
    out = run_task(ws, "train", 1, PARAMS)
    # one agent's round: aggregate it on a server, which sends round 1's coefficients back
    result = TaskResult(
        run_id="run-1",
        round=1,
        task_id="r1-train-a",
        agent_id="a",
        method="ferret",
        num_examples=out.num_examples,
        metrics=out.metrics,
    )
    server.add(server.validate(1, result, {k: memoryview(v) for k, v in out.blobs.items()}))
    server.finish_round(1)
    assignment = server.assign(1, "a", "eval")
    assert set(assignment.blobs) == {"step-000001"}
    got = run_task(ws, "eval", 1, assignment.params, assignment.blobs)
    assert set(got.metrics) >= {"eval_loss", "eval_em"} and got.num_examples == len(EVAL)
    server.wait_weights()
    assert held(ws).round == 1
    for name, tensor in server.weights.items():
        assert torch.equal(held(ws).tensors[name], tensor)
    # a fresh agent (lost its model) asked to train round 3 without the steps: it resyncs
    ws.cache.clear()
    resync = run_task(ws, "train", 3, assignment.params)
    assert resync.num_examples == 0
    assert resync.metrics == {spec.HELD_ROUND: 0.0, spec.OUT_OF_SYNC: 1.0}
    empty = payloads.decode(resync.blobs[spec.UPDATE_BLOB])
    assert empty.tensors["value"].numel() == 0
    with pytest.raises(TaskError, match="cannot reach global round 2"):
        run_task(ws, "eval", 2, assignment.params)


def test_refuses_another_layout_and_foreign_blobs(ws: TinyWorkspace) -> None:
    bad = PARAMS | {"ferret": {"k": 6, "layout": "0" * 64}}
    with pytest.raises(TaskError, match="layout"):
        run_task(ws, "eval", 0, bad)
    with pytest.raises(TaskError, match="unexpected blob"):
        run_task(ws, "eval", 0, PARAMS, {"weights": b"x"})
    wrong_round = payloads.encode_seedcoef(
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1),
        base_seed=randomness.derive_key(0, 2),  # another pool's base seed
        k=6,
        n_groups=len(held(ws).layout.groups),
        method="ferret",
        round=1,
    )
    ws.cache.clear()
    with pytest.raises(TaskError, match="step of round 1 rejected"):
        run_task(ws, "eval", 1, PARAMS, {"step-000001": wrong_round})


def test_seed_choices_and_batches_come_from_run_seed_round_and_agent() -> None:
    p = parse_params("ferret", {"ferret": {"seed": 9}})
    assert isinstance(p, spec.Params)

    def draw(params: spec.Params, round: int, agent: str) -> list[int]:
        return fm.choose_seeds(64, 8, choice_rng(params.ferret, round, agent))

    assert draw(p, 2, "a") == draw(p, 2, "a")
    other_seed = parse_params("ferret", {"ferret": {"seed": 10}})
    assert isinstance(other_seed, spec.Params)
    draws = [draw(p, 2, "b"), draw(p, 3, "a"), draw(other_seed, 2, "a")]
    assert all(d != draw(p, 2, "a") for d in draws)
    assert sgd_seed(p, 2, "a") == sgd_seed(p, 2, "a") != sgd_seed(p, 2, "b")
    other_train = parse_params("ferret", {"ferret": {"seed": 9}, "train": {"seed": 1}})
    assert isinstance(other_train, spec.Params)
    assert sgd_seed(other_train, 2, "a") != sgd_seed(p, 2, "a")


class TakingWorkspace(TinyWorkspace):
    """A workspace that hands its base over (as the agent's does): no copy of the weights."""

    def __init__(self, resolved: ResolvedModel) -> None:
        super().__init__(resolved)
        self.taken: list[Any] = []

    def take_base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        base = self.base(model, quant)
        del self._bases[quant]
        self.taken.append(base[0])
        return base


def test_a_taken_base_trains_in_place_with_the_same_update_and_the_file_untouched(
    tiny_resolved: ResolvedModel,
) -> None:
    copying, taking = TinyWorkspace(tiny_resolved), TakingWorkspace(tiny_resolved)
    out_copy = run_task(copying, "train", 1, PARAMS)
    out_take = run_task(taking, "train", 1, PARAMS)
    assert held(taking).model is taking.taken[0]  # trained in place, not copied
    assert held(copying).model is not copying._bases["fp32"][0]
    assert out_take.blobs == out_copy.blobs  # the same triples, bit for bit
    fresh, _ = taking.base(BaseModelRef(name="t", sha256=tiny_resolved.sha256), "fp32")
    assert fresh is not taking.taken[0]  # a later base() loads again, from unchanged files
    for name, p in fresh.named_parameters():
        assert torch.equal(held(taking).tensors[name], p.data)
    assert model_files.weights_sha256(tiny_resolved.path) == tiny_resolved.sha256
