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
from edge_agent.methods.fedbiot.client import EmulatorModel, FedbiotClient, proximal
from edge_agent.model.store import ResolvedModel, resolve_model
from edge_agent.training.data import Example, load_jsonl
from edge_agent.training.train import TrainConfig, train_lora
from protocol import payloads
from protocol.messages import BaseModelRef, TaskAssign
from protocol.methods import parse_params
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st
from tests.aggregator.methods.test_fedbiot_server import make_tiny, result, server
from tests.helpers.engine_harness import PROFILE


class Workspace:
    """The Workspace protocol for one agent; ``base`` must never be needed by FedBiOT."""

    def __init__(self, resolved: ResolvedModel, objects: Path, data: Path) -> None:
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        self.objects = ObjectStore(objects)
        examples = load_jsonl(data)
        self.train_examples: list[Example] = examples[:12]
        self.eval_examples: list[Example] = examples[12:16]
        self.progress = False

    def resolved_model(self) -> ResolvedModel:
        return self.resolved

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        raise AssertionError("a FedBiOT agent must not load the base model")

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
    return FedbiotClient().run(task, ws)


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


def test_the_proximal_term_keeps_the_adapter_near_its_round_start(setup: Any) -> None:
    s, resolved, files, root = setup
    ws = Workspace(resolved, root / "agent-a", files["agent-0"])
    a = s.assign(s.copies.version, "a", "eval")
    run(ws, a.params, a.blobs, s.copies.version, "eval")
    em = ws.cache["fedbiot"]
    tokenizer = ws.cache[f"fedbiot:tokenizer:{resolved.sha256}"]
    params = [p for p in em.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    cfg = TrainConfig(steps=4, batch_size=2, lr=5e-2, max_len=48, grad_clip=None)
    drift = {}
    for weight in (0.0, 50.0):
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        train_lora(
            em.model, tokenizer, ws.train_examples, cfg, extra_loss=proximal(em.model, weight)
        )
        drift[weight] = sum(
            float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(params, start, strict=True)
        )
    assert proximal(em.model, 0.0) is None
    assert drift[50.0] < 0.5 * drift[0.0], drift


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
