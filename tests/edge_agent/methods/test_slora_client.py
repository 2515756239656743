"""SLoRA client half on a tiny random Llama: masked stage-1 training, stage 2 from the SVD init."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from aggregator.methods import MethodContext
from aggregator.methods.slora.server import SloraServer
from edge_agent.daemon.objects import ObjectStore
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.slora.client import SloraClient, sparse_deltas, sparse_masks, sparse_targets
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example
from edge_agent.training.train import TrainConfig, train_lora
from protocol import payloads
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params
from protocol.methods.slora import spec

TRAIN = [
    Example("Capital of France?", "Paris"),
    Example("Capital of Italy?", "Rome"),
    Example("Say hello.", "hello hello"),
    Example("Two plus two?", "four"),
]
EVAL = [Example("Capital of Spain?", "Madrid"), Example("Say bye.", "bye bye")]
Q0 = "model.layers.0.self_attn.q_proj.weight"


class TinyWorkspace:
    """The Workspace protocol over the tiny model; records which quantizations were asked for."""

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

    def take_base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        raise AssertionError("slora never takes the base over")

    @property
    def objects(self) -> ObjectStore:
        raise AssertionError("slora keeps no objects")

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


def method_params(**sparse: Any) -> dict[str, Any]:
    return {
        "lora": {"r": 64, "alpha": 128.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "max_len": 32},
        "eval": {"max_len": 32, "batch_size": 2, "max_new_tokens": 3},
        "sparse": {
            "stage1_rounds": 1,
            "density": 0.01,
            "mask_seed": 0,
            "target_modules": ["q_proj", "v_proj"],
            **sparse,
        },
    }


def run_task(
    ws: TinyWorkspace,
    params: Mapping[str, Any],
    blobs: Mapping[str, bytes | bytearray | memoryview],
    *,
    round: int,
    kind: str = "train",
    quant: str = "nf4",
) -> TaskOutput:
    assign = TaskAssign(
        run_id="run-t",
        round=round,
        task_id=f"r{round}-{kind}",
        kind=kind,  # type: ignore[arg-type]
        method="slora",
        model=BaseModelRef(name="tiny", sha256=ws.resolved.sha256),
        quant=quant,  # type: ignore[arg-type]
        params=dict(params),
    )
    task = TaskInput(
        assign=assign,
        params=parse_params("slora", assign.params),
        blobs={k: memoryview(v) for k, v in blobs.items()},
    )
    return SloraClient().run(task, ws)


def as_result(out: TaskOutput, round: int) -> TaskResult:
    return TaskResult(
        run_id="run-t",
        round=round,
        task_id=f"r{round}-train",
        agent_id="a",
        method="slora",
        num_examples=out.num_examples,
        metrics=out.metrics,
    )


def test_stage1_trains_exactly_the_masked_entries(tiny_resolved: ResolvedModel) -> None:
    model, tokenizer = load_base(tiny_resolved, "fp32", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = sparse_targets(model, ("q_proj", "v_proj"))
    assert sorted(targets) == sorted(
        f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    )
    masks = sparse_masks(targets, 0, 0.01)
    assert {n: m.numel() for n, m in masks.items()} == {
        Q0: 46,
        "model.layers.0.self_attn.v_proj.weight": 22,
        "model.layers.1.self_attn.q_proj.weight": 56,
        "model.layers.1.self_attn.v_proj.weight": 17,
    }
    with sparse_deltas(model, targets, masks) as deltas:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == 46 + 22 + 56 + 17  # all AdamW will hold
        assert {id(p) for p in trainable} == {id(d) for d in deltas.values()}
        train_lora(model, tokenizer, TRAIN, TrainConfig(steps=3, batch_size=2, lr=1e-2))
        effective = {n: t.weight.detach().clone() for n, t in targets.items()}
        trained = {n: d.detach().clone() for n, d in deltas.items()}
    for name, w in effective.items():
        changed = (w != before[name]).reshape(-1).nonzero().squeeze(1)
        mask = masks[name]
        assert set(changed.tolist()) <= set(mask.tolist())  # nothing outside the mask moved
        assert changed.numel() >= 0.9 * mask.numel()  # and the mask did train
        torch.testing.assert_close(
            w.reshape(-1)[mask] - before[name].reshape(-1)[mask], trained[name]
        )
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()  # parametrizations removed
    assert all(torch.equal(after[n], before[n]) for n in before)  # the base is the original


def test_stage1_task_on_an_nf4_run_trains_fp32_and_sends_values_only(
    tiny_resolved: ResolvedModel, tiny_model_dir: Any
) -> None:
    ws = TinyWorkspace(tiny_resolved)
    out = run_task(ws, method_params(), {}, round=1, quant="nf4")
    assert ws.quants == ["fp32"]  # masked entries of NF4 weights cannot be trained
    assert out.num_examples == 4 and out.metrics["steps"] == 3.0
    assert out.metrics["masked_values"] == 141.0
    blob = out.blobs[spec.UPDATE_BLOB]
    server = SloraServer(method_params(), MethodContext(model_dir=tiny_model_dir))
    update = server.validate(1, as_result(out, 1), {"update": memoryview(blob)})
    assert {n: v.numel() for n, v in update.tensors.items()} == server.mask_counts()
    assert all(v.abs().max() > 0 for v in update.tensors.values())


def test_stage1_starts_from_the_global_update(
    tiny_resolved: ResolvedModel, tiny_model_dir: Any
) -> None:
    ws = TinyWorkspace(tiny_resolved)
    server = SloraServer(method_params(stage1_rounds=5), MethodContext(model_dir=tiny_model_dir))
    base_eval = run_task(ws, method_params(), {}, round=0, kind="eval")
    assert base_eval.blobs == {} and base_eval.num_examples == 2
    server.values = {n: torch.full((c,), 0.5) for n, c in server.mask_counts().items()}
    assign = server.assign(1, "a", "train")
    assert assign.params["stage"] == 1
    evaluated = run_task(ws, assign.params, assign.blobs, round=1, kind="eval")
    assert abs(evaluated.metrics["eval_loss"] - base_eval.metrics["eval_loss"]) > 1e-3
    quiet = {**assign.params, "train": {**assign.params["train"], "lr": 1e-9, "steps": 1}}
    out = run_task(ws, quiet, assign.blobs, round=1)
    update = payloads.decode(out.blobs[spec.UPDATE_BLOB])
    for name, values in update.tensors.items():
        torch.testing.assert_close(values, torch.full_like(values, 0.5), rtol=0, atol=1e-6)
        assert name in server.mask_counts()


def test_stage2_starts_from_the_svd_of_stage1(
    tiny_resolved: ResolvedModel, tiny_model_dir: Any
) -> None:
    """With r = 64 the truncation is exact: the stage-2 model equals the stage-1 model."""
    ws = TinyWorkspace(tiny_resolved)
    server = SloraServer(method_params(), MethodContext(model_dir=tiny_model_dir))
    server.begin_round(1)
    out = run_task(ws, server.assign(1, "a", "train").params, {}, round=1, quant="fp32")
    server.add(server.validate(1, as_result(out, 1), {"update": memoryview(out.blobs["update"])}))
    assert server.finish_round(1)["stage"] == 1.0
    sparse_task = server.assign(1, "a", "eval")
    assert sparse_task.params["stage"] == 1 and spec.GLOBAL_BLOB in sparse_task.blobs
    sparse_eval = run_task(ws, sparse_task.params, sparse_task.blobs, round=1, kind="eval")
    server.begin_round(2)  # the switch
    assert server.stage == 2 and server.svd_energy == pytest.approx(1.0)
    lora_eval_task = server.assign(2, "a", "eval")
    assert lora_eval_task.params["stage"] == 2
    lora_eval = run_task(
        ws, lora_eval_task.params, lora_eval_task.blobs, round=2, kind="eval", quant="fp32"
    )
    assert lora_eval.metrics["eval_loss"] == pytest.approx(
        sparse_eval.metrics["eval_loss"], abs=1e-4
    )
    task2 = server.assign(2, "a", "train")
    out2 = run_task(ws, task2.params, task2.blobs, round=2, quant="fp32")
    update = server.validate(2, as_result(out2, 2), {"update": memoryview(out2.blobs["update"])})
    assert update.tensors.keys() == server.lora.keys()
    moved = [k for k, v in update.tensors.items() if not torch.equal(v, server.lora[k])]
    assert len(moved) == len(server.lora)  # LoRA trains from the SVD init
    # the fp32 base is now wrapped by peft: stage 1 of a new run still sees the plain weights
    again = run_task(ws, sparse_task.params, sparse_task.blobs, round=1, kind="eval")
    assert again.metrics["eval_loss"] == pytest.approx(sparse_eval.metrics["eval_loss"], abs=1e-6)


def test_stage1_covers_every_linear_layer_by_default_and_says_why_fp32(
    tiny_resolved: ResolvedModel, tiny_model_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    params = method_params()
    del params["sparse"]["target_modules"]
    params["lora"] = {"r": 4, "alpha": 8.0}
    ws = TinyWorkspace(tiny_resolved)
    with caplog.at_level(logging.INFO, logger="edge_agent.methods.slora.client"):
        out = run_task(ws, params, {}, round=1, quant="nf4")
    assert ws.quants == ["fp32"]
    assert any("stage 1 trains on the fp32 base, not nf4" in r.message for r in caplog.records)
    server = SloraServer(params, MethodContext(model_dir=tiny_model_dir))
    assert server.shapes is not None and len(server.shapes) == 14  # 7 linear layers x 2 blocks
    update = server.validate(1, as_result(out, 1), {"update": memoryview(out.blobs["update"])})
    assert update.tensors.keys() == server.shapes.keys()
    assert out.metrics["masked_values"] == float(sum(server.mask_counts().values()))
    mlp = [n for n in update.tensors if ".mlp." in n]
    assert len(mlp) == 6 and all(update.tensors[n].abs().max() > 0 for n in mlp)


@pytest.mark.parametrize(("init", "kept"), [("svd", 1.0), ("random", 0.0)])
def test_the_switch_round_reports_what_the_init_kept(
    tiny_resolved: ResolvedModel, tiny_model_dir: Any, init: str, kept: float
) -> None:
    """r = 64 holds the whole update: the SVD init keeps all of stage 1's eval gain, the
    random init (B = 0) none of it."""
    ws = TinyWorkspace(tiny_resolved)
    server = SloraServer(method_params(init=init), MethodContext(model_dir=tiny_model_dir))

    def eval_round(round: int) -> None:
        task = server.assign(round, "a", "eval")
        run_task(ws, task.params, task.blobs, round=round, kind="eval", quant="fp32")

    eval_round(0)
    server.begin_round(1)
    task = server.assign(1, "a", "train")
    out = run_task(ws, task.params, task.blobs, round=1, quant="fp32")
    server.add(server.validate(1, as_result(out, 1), {"update": memoryview(out.blobs["update"])}))
    server.finish_round(1)
    eval_round(1)
    server.begin_round(2)
    task = server.assign(2, "a", "train")
    assert task.params["switch_eval"] is True
    out = run_task(ws, task.params, task.blobs, round=2, quant="fp32")
    m = out.metrics
    assert m["switch_eval_examples"] == 2.0
    assert m["switch_eval_base_loss"] - m["switch_eval_sparse_loss"] > 0.05  # stage 1 learnt
    server.add(server.validate(2, as_result(out, 2), {"update": memoryview(out.blobs["update"])}))
    metrics = server.finish_round(2)
    assert metrics["switch_gain_kept"] == pytest.approx(kept, abs=1e-3)
    assert metrics["switch_eval_loss"] == pytest.approx(m["switch_eval_loss"])
