"""FedBiOT client half against the real server half on a tiny 6-layer Llama: the agent's emulator
is the server's bit for bit, after deltas, after missed rounds and after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.methods import AgentView
from aggregator.methods.fedbiot.server import FedbiotServer
from edge_agent.daemon.objects import ObjectStore
from edge_agent.daemon.workspace import ModelMismatch
from edge_agent.errors import TaskError
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.fedbiot.client import EmulatorModel, FedbiotClient
from edge_agent.methods.fedbiot.prox import merged_proximal
from edge_agent.model.store import ResolvedModel, load_base, resolve_model
from edge_agent.training.data import Example, load_jsonl
from edge_agent.training.train import TrainConfig, evaluate, train_lora
from protocol import payloads
from protocol.messages import BaseModelRef, TaskAssign
from protocol.methods import parse_params
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st
from tests.aggregator.methods.test_fedbiot_server import make_tiny, one_round, result, server
from tests.helpers.engine_harness import PROFILE


class Workspace:
    """The Workspace protocol for one agent; training must never load the base model (only an
    evaluation does, to score the full model with the adapter plugged back)."""

    def __init__(self, resolved: ResolvedModel, objects: Path, data: Path) -> None:
        self.resolved = resolved
        self.training = False
        self.bases_taken = 0
        self.cache: dict[str, Any] = {}
        self.objects = ObjectStore(objects)
        examples = load_jsonl(data)
        self.train_examples: list[Example] = examples[:12]
        self.eval_examples: list[Example] = examples[12:16]
        self.progress = False

    def resolved_model(self) -> ResolvedModel:
        return self.resolved

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        raise AssertionError("a FedBiOT agent must not keep the base model")

    def take_base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        assert not self.training, "a FedBiOT agent must not load the base model to train"
        assert model.sha256 == self.resolved.sha256
        self.bases_taken += 1
        return load_base(self.resolved, quant, device="cpu")  # type: ignore[arg-type]

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


def run(
    ws: Workspace, params: dict[str, Any], blobs: Any, round: int, kind: str, model: str = ""
) -> TaskOutput:
    assign = TaskAssign(
        run_id="run-t",
        round=round,
        task_id=f"r{round}-{kind}",
        kind=kind,  # type: ignore[arg-type]
        method="fedbiot",
        model=BaseModelRef(name="tiny", sha256=model or ws.resolved.sha256),
        quant="fp32",
        params=params,
    )
    task = TaskInput(
        assign=assign,
        params=parse_params("fedbiot", params),
        blobs={k: memoryview(v) for k, v in blobs.items()},
    )
    ws.training = kind == "train"
    try:
        return FedbiotClient().run(task, ws)
    finally:
        ws.training = False


def task(s: FedbiotServer, ws: Workspace, agent: str, round: int, kind: str = "train") -> Any:
    a = s.assign(round, agent, kind)
    return a, run(ws, a.params, a.blobs, round, kind)


def assert_same_emulator(em: EmulatorModel, s: FedbiotServer) -> None:
    """The agent's alignment state and every weight of its small model are the server's."""
    assert s.copies.state is not None and em.version == s.copies.version
    assert em.align is not None and set(em.align) == set(s.copies.state)
    assert all(torch.equal(em.align[n], s.copies.state[n]) for n in s.copies.state)
    bundle = emu.decode_bundle(s.copies.bundle)
    expected = {n: t.to(torch.float32) for n, t in bundle.tensors.items()}
    expected |= st.merged_weights(expected, s.copies.state, s.params.align.scaling)
    weights = dict(em.model.get_base_model().named_parameters())
    for name, want in expected.items():  # LoRA-wrapped linears keep theirs as base_layer
        got = weights.get(name, weights.get(name.replace(".weight", ".base_layer.weight")))
        assert got is not None and torch.equal(got, want), name


def align_specs(s: FedbiotServer) -> dict[str, tuple[int, ...]]:
    assert s.copies.state is not None
    return {k: tuple(v.shape) for k, v in s.copies.state.items()}


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any
) -> tuple[FedbiotServer, ResolvedModel, dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("fedbiot-client")
    model_dir, files = make_tiny(root, embedded_tokenizer)
    s = server(model_dir, files["public"])
    s.prepare()
    return s, resolve_model(str(model_dir)), files, root


def test_agent_emulator_is_the_servers_bit_for_bit_round_after_round(setup: Any) -> None:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-a", files["agent-0"])
    first, out = task(s, ws, "a", 1)
    assert set(first.blobs) == {spec.EMULATOR_BLOB, spec.ALIGN_BLOB}
    em = ws.cache["fedbiot"]
    assert_same_emulator(em, s)
    assert set(ws.objects.holdings()) == {s.copies.bundle_sha, s.copies.shas[1]}
    # the update names the full model's adapter layers (4, 5), and the server takes it
    update = payloads.decode(out.blobs[spec.UPDATE_BLOB])
    assert {emu.layer_of(n) for n in update.tensors} == {4, 5}
    assert update.meta["fedbiot.align"] == s.copies.shas[1]
    s.begin_round(1)
    s.add(
        s.validate(1, result(1, "a", out.num_examples), {"update": memoryview(out.blobs["update"])})
    )
    s.finish_round(1)
    evaluated = task(s, ws, "a", 1, "eval")[1]
    assert evaluated.num_examples == 4 and evaluated.metrics["eval_loss"] > 0
    assert evaluated.metrics["emulator_eval_loss"] > 0
    second, _ = task(s, ws, "a", 2)  # after the alignment of round 1: one small delta
    assert set(second.blobs) == {spec.GLOBAL_BLOB, spec.ALIGN_BLOB}
    assert len(second.blobs[spec.ALIGN_BLOB]) < len(s.copies.bundle) / 100
    assert st.decode_align(second.blobs[spec.ALIGN_BLOB], align_specs(s)).versions == [1, 2]
    assert_same_emulator(ws.cache["fedbiot"], s)
    assert set(ws.objects.holdings()) == {s.copies.bundle_sha, s.copies.shas[2]}  # v1 was replaced


def test_a_restarted_agent_rebuilds_the_same_emulator_from_its_store(setup: Any) -> None:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-a", files["agent-0"])  # same store, empty memory
    s.on_hello(AgentView("a", PROFILE, holds=frozenset(ws.objects.holdings())))
    again = s.assign(s.copies.version, "a", "eval")
    assert set(again.blobs) <= {spec.GLOBAL_BLOB}  # neither the bundle nor the alignment
    run(ws, again.params, again.blobs, s.copies.version, "eval")
    assert_same_emulator(ws.cache["fedbiot"], s)


def advance_server(s: FedbiotServer, rounds: list[int]) -> None:
    """Rounds the agent sits out: each ends with an alignment (a new version)."""
    for round in rounds:
        s.begin_round(round)
        s.finish_round(round)
        s.prepare()


def test_an_agent_rounds_behind_catches_up_exactly(setup: Any) -> None:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-b", files["agent-1"])
    task(s, ws, "b", s.copies.version, "eval")
    behind = s.copies.version
    advance_server(s, [10])
    # restarted meanwhile: the deltas apply to the state it stored
    ws = Workspace(resolved, root / "agent-b", files["agent-1"])
    s.on_hello(AgentView("b", PROFILE, holds=frozenset(ws.objects.holdings())))
    one_behind, _ = task(s, ws, "b", 11)
    blob = st.decode_align(one_behind.blobs[spec.ALIGN_BLOB], align_specs(s))
    assert blob.kind == "deltas" and blob.versions == [behind, behind + 1]
    assert_same_emulator(ws.cache["fedbiot"], s)
    advance_server(s, [11, 12])
    two_behind, _ = task(s, ws, "b", 13)
    raw = two_behind.blobs[spec.ALIGN_BLOB]
    assert s.copies.state is not None
    assert len(raw) == min(
        len(st.state_bytes(s.copies.state, s.copies.version)),
        len(
            st.encode_deltas(
                {v: s.copies.deltas[v] for v in (behind + 2, behind + 3)},
                behind + 1,
                [s.copies.shas[v] for v in range(behind + 1, behind + 4)],
            )
        ),
    )  # the cheaper of the two missing deltas and the whole state
    assert_same_emulator(ws.cache["fedbiot"], s)


def test_the_task_model_is_checked_without_loading_it(setup: Any) -> None:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-c", files["agent-0"])
    a = s.assign(s.copies.version, "c", "eval")
    with pytest.raises(ModelMismatch, match="but this agent holds"):  # the task names another model
        run(ws, a.params, a.blobs, s.copies.version, "eval", model="0" * 64)
    assert not ws.objects.holdings()  # refused before anything was stored or built


def prepared_emulator(setup: Any) -> tuple[Workspace, EmulatorModel, Any]:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-a", files["agent-0"])
    a = s.assign(s.copies.version, "a", "eval")
    run(ws, a.params, a.blobs, s.copies.version, "eval")
    return ws, ws.cache["fedbiot"], ws.cache[f"fedbiot:tokenizer:{resolved.sha256}"]


def merged_deltas(model: Any) -> dict[str, torch.Tensor]:
    """Per adapted linear, the merged weight's LoRA part s·B·A, computed densely."""
    from peft.tuners.lora import LoraLayer

    return {
        name: m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def test_the_proximal_term_is_lambda_times_the_merged_weights_distance(setup: Any) -> None:
    """λ·Σ‖(W + sBA) − (W + sB₀A₀)‖²_F over the adapter layers' linears, by hand (dense), and
    its gradient is the dense formula's; not a distance between the LoRA factors."""
    _, em, _ = prepared_emulator(setup)
    params = [p for p in em.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a round start with B ≠ 0
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    start = {k: v.detach().clone() for k, v in merged_deltas(em.model).items()}
    assert len(start) == 4  # q and v of the two adapter layers
    term, scaled = merged_proximal(em.model, 1.0), merged_proximal(em.model, 2.5)
    assert (
        term is not None
        and scaled is not None
        and float(term(em.model).detach()) == pytest.approx(0.0, abs=1e-9)
    )
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    dense = sum(
        (delta - start[name]).pow(2).sum() for name, delta in merged_deltas(em.model).items()
    )
    assert float(dense.detach()) > 1e-3
    got = term(em.model)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-7)
    by_term = torch.autograd.grad(2.5 * got, params)
    by_hand = torch.autograd.grad(2.5 * dense, params)
    for g, h in zip(by_term, by_hand, strict=True):
        assert g.abs().sum() > 0  # every factor gets a gradient
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scaled(em.model), 2.5 * dense, rtol=1e-4, atol=1e-7)
    assert merged_proximal(em.model, 0.0) is None
    # moving A and B so that B·A stays the same costs nothing: the term is on the merged weights
    with torch.no_grad():
        for p in params:
            p.mul_(2.0 if ".lora_A." in _name_of(em.model, p) else 0.5)
    torch.testing.assert_close(term(em.model), dense, rtol=1e-4, atol=1e-7)


def _name_of(model: Any, param: torch.nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_the_proximal_term_keeps_the_adapter_near_its_round_start(setup: Any) -> None:
    ws, em, tokenizer = prepared_emulator(setup)
    params = [p for p in em.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    start_delta = {k: v.detach().clone() for k, v in merged_deltas(em.model).items()}
    cfg = TrainConfig(steps=4, batch_size=2, lr=5e-2, max_len=48, grad_clip=None)
    drift = {}
    for weight in (0.0, 1e4):
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        extra = merged_proximal(em.model, weight)
        train_lora(em.model, tokenizer, ws.train_examples, cfg, extra_loss=extra)
        with torch.no_grad():
            drift[weight] = sum(
                float((d - start_delta[k]).pow(2).sum()) for k, d in merged_deltas(em.model).items()
            )
    assert drift[0.0] > 0
    assert drift[1e4] < 0.5 * drift[0.0], drift


def test_an_evaluation_scores_the_full_model_with_the_adapter_plugged_back(
    setup: Any, tmp_path: Path
) -> None:
    """eval_loss is the full 6-layer model's with the global adapter on layers 4 and 5 (as stock
    peft loads the export), on the agent's held-out examples; the emulator's is a side metric."""
    from peft import PeftModel

    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-e", files["agent-1"])
    one_round(s, s.copies.version + 1, {"x": 0.01, "y": 0.02})  # a global adapter with B ≠ 0
    a = s.assign(s.copies.version, "e", "eval")
    assert spec.GLOBAL_BLOB in a.blobs
    out = run(ws, a.params, a.blobs, s.copies.version, "eval")
    assert ws.bases_taken == 1
    s.export(tmp_path / "adapter", base_model_name=str(resolved.path))
    base, tokenizer = load_base(resolved, "fp32", device="cpu")
    stock = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    e = s.params.eval
    examples = ws.eval_examples[: e.max_examples]
    want = evaluate(stock, tokenizer, examples, max_len=e.max_len, batch_size=e.batch_size)
    assert out.metrics["eval_loss"] == pytest.approx(want.loss, rel=1e-5)
    em = ws.cache["fedbiot"]
    on_emulator = evaluate(em.model, tokenizer, examples, max_len=e.max_len,
                           batch_size=e.batch_size)  # fmt: skip
    assert out.metrics["emulator_eval_loss"] == pytest.approx(on_emulator.loss, rel=1e-5)
    assert abs(out.metrics["eval_loss"] - out.metrics["emulator_eval_loss"]) > 1e-3
    plain = evaluate(load_base(resolved, "fp32", device="cpu")[0], tokenizer, examples,
                     max_len=e.max_len, batch_size=e.batch_size)  # fmt: skip
    assert abs(plain.loss - out.metrics["eval_loss"]) > 1e-4  # the adapter is plugged in


def test_a_bundle_larger_than_a_part_travels_in_parts(setup: Any) -> None:
    """With emulator.part_mb = 1 the tiny bundle (~6 MB) travels as byte ranges; the agent joins
    them into the same bundle (its sha256 is checked) and builds the server's emulator."""
    s, resolved, files, root = setup
    size, kept = len(s.copies.bundle), s.copies.part_bytes
    s.copies.part_bytes = 1 << 20
    try:
        a = s.assign(s.copies.version, "p", "eval")
    finally:
        s.copies.part_bytes = kept
    parts = sorted(k for k in a.blobs if k.startswith(spec.EMULATOR_BLOB))
    assert spec.EMULATOR_BLOB not in a.blobs and len(parts) == -(-size // (1 << 20)) > 1
    assert all(len(a.blobs[k]) <= 1 << 20 for k in parts)
    ws = Workspace(resolved, root / "agent-p", files["agent-0"])
    run(ws, a.params, a.blobs, s.copies.version, "eval")
    assert_same_emulator(ws.cache["fedbiot"], s)
    assert s.copies.bundle_sha in ws.objects.holdings()
    gap = {k: v for k, v in a.blobs.items() if k != f"{spec.EMULATOR_BLOB}.1"}
    with pytest.raises(TaskError, match="not 0.."):  # a part missing: refused, nothing built
        run(Workspace(resolved, root / "agent-q", files["agent-0"]), a.params, gap,
            s.copies.version, "eval")  # fmt: skip
