"""FedBiOT server half on a tiny 6-layer Llama: emulator cut, alignment, what travels, restart,
export into the full model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.engine.admission import Waiting
from aggregator.engine.engine import RoundEngine, RoundSummary
from aggregator.errors import ConfigError
from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.methods import AgentView, MethodContext
from aggregator.methods.fedbiot import align
from aggregator.methods.fedbiot import bundle as bundle_io
from aggregator.methods.fedbiot.server import FedbiotServer
from aggregator.ops.config import build_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol import payloads
from protocol.frames import decode, encode
from protocol.messages import Hello, TaskAssign, TaskResult
from protocol.methods.fedbiot import emulator as emu
from protocol.methods.fedbiot import spec
from protocol.methods.fedbiot import state as st
from tests.helpers.engine_harness import MODEL, PROFILE, SHA, Clock, assigns

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
PARAMS: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"steps": 2, "batch_size": 2, "max_len": 64},
    "eval": {"max_len": 64, "batch_size": 4, "max_new_tokens": 3, "max_examples": 4},
    "align": {"initial_steps": 6, "steps": 2, "lr": 1e-2, "max_len": 64, "holdout": 8},
}


def make_tiny(root: Path, tokenizer: Any) -> tuple[Path, dict[str, Path]]:
    """A random 6-layer Llama (HF dir, real tokenizer) and the demo data (agents, eval, public)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    files = write_demo(root / "data", make_demo_split(2, per_agent=16, n_eval=16, n_public=40))
    return root / "model", files


def server(model_dir: Path, public: Path, **align_params: Any) -> FedbiotServer:
    params = {**PARAMS, "align": {**PARAMS["align"], **align_params}}
    return FedbiotServer(params, MethodContext(model_dir=model_dir, public_data=public))


def update_blob(s: FedbiotServer, round: int, fill: float) -> bytes:
    """An adapter update as an agent sends it: full-model names of the adapter layers."""
    expect = s._expect(round)
    assert expect.tensors is not None
    tensors = {}
    for name, t in expect.tensors.items():
        shape = tuple(4 if d is None else d for d in t.shape)
        tensors[name] = torch.full(shape, fill) + torch.arange(shape[0] * shape[1]).reshape(
            shape
        ) / (1000 * shape[1])
    meta = {
        "fedbiot.emulator": s.copies.bundle_sha,
        "fedbiot.align": s.copies.shas[s.copies.version],
    }
    return payloads.encode(
        payloads.PayloadKind.LORA, tensors, method="fedbiot", round=round, meta=meta
    )


def result(round: int, agent: str, n: int) -> TaskResult:
    return TaskResult(
        run_id="run-t",
        round=round,
        task_id=f"r{round}-{agent}",
        agent_id=agent,
        method="fedbiot",
        num_examples=n,
        metrics={"train_loss": 1.0},
    )


def one_round(s: FedbiotServer, round: int, fills: dict[str, float]) -> dict[str, float]:
    s.begin_round(round)
    for agent, fill in fills.items():
        blob = update_blob(s, round, fill)
        s.add(s.validate(round, result(round, agent, 10), {"update": memoryview(blob)}))
    return s.finish_round(round)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any) -> tuple[Path, Path]:
    model_dir, files = make_tiny(tmp_path_factory.mktemp("fedbiot"), embedded_tokenizer)
    return model_dir, files["public"]


@pytest.fixture(scope="module")
def prepared(tiny: tuple[Path, Path]) -> FedbiotServer:
    s = server(*tiny)
    s.prepare()
    return s


def test_emulator_keeps_uniform_layers_and_counts_parameters(prepared: FedbiotServer) -> None:
    s = prepared
    assert s.emu_plan is not None
    assert s.emu_plan.emulator == (0, 3) and s.emu_plan.adapter == (
        4,
        5,
    )  # bottom 0..3, half dropped
    bundle = emu.decode_bundle(s.copies.bundle)
    assert bundle.config["num_hidden_layers"] == 4
    assert bundle.plan.layer_map == (0, 3, 4, 5)
    assert all(t.dtype == torch.bfloat16 for t in bundle.tensors.values())
    assert "lm_head.weight" not in bundle.tensors  # tied to the embeddings
    vocab, h, kv, inter = len(bundle.tensors["model.embed_tokens.weight"]), 64, 32, 128
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert emu.param_count(tuple(t.shape) for t in bundle.tensors.values()) == (
        vocab * h + 4 * layer + h
    )
    assert s.ratio == pytest.approx((vocab * h + 4 * layer + h) / (vocab * h + 6 * layer + h))
    assert len(s.copies.bundle) == pytest.approx(2 * (vocab * h + 4 * layer + h), rel=0.01)


def test_an_emulator_that_drops_nothing_computes_what_the_full_model_computes(
    tiny: tuple[Path, Path],
) -> None:
    model_dir, _ = tiny
    plan = emu.plan_emulator(6, 2, 0.0)
    data, full_n, small_n = bundle_io.build_bundle(model_dir, plan, "fp32", "ab" * 32)
    assert plan.emulator == (0, 1, 2, 3) and full_n == small_n
    small, full = bundle_io.build_small(emu.decode_bundle(data)), bundle_io.load_full(model_dir)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, full(input_ids=ids).logits)


def test_alignment_lowers_the_held_out_hidden_state_loss(prepared: FedbiotServer) -> None:
    s = prepared
    assert s.aligner is not None
    assert not set(s.aligner.train_rows) & set(s.aligner.held_rows)
    assert len(s.aligner.held_rows) == 8 and s.copies.version == 1
    raw, aligned = s.align_metrics["align_loss_raw"], s.align_metrics["align_loss"]
    assert aligned < 0.7 * raw, (raw, aligned)
    # the loss the metric reports is the held-out loss of the version agents are given
    assert s.copies.state is not None
    assert s.aligner.held_loss(s.copies.state) == pytest.approx(aligned)


def test_public_data_is_read_as_agents_read_theirs(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """read_public is edge_agent.training.data's reader and tokenizer: the prompt is masked, the response
    kept, and a bad record is a ConfigError naming file and line."""
    from transformers import AutoTokenizer

    model_dir, public = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = align.read_public(public, tokenizer, 48)
    assert samples and all(len(s.input_ids) <= 48 for s in samples)
    assert all(s.labels[0] == -100 and s.num_target_tokens > 0 for s in samples)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"nothing": 1}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        align.read_public(bad, tokenizer, 48)


@pytest.fixture(scope="module")
def trained(tiny: tuple[Path, Path]) -> tuple[FedbiotServer, Any, dict[str, float]]:
    """Three rounds with history 2; the state saved as the engine saves it after round 3 (its
    alignment still due), and round 3's metrics. The server then ran that alignment."""
    s = server(*tiny, history=2)
    s.prepare()
    first = s.assign(1, "a", "train")
    assert set(first.blobs) == {spec.EMULATOR_BLOB, spec.ALIGN_BLOB}
    assert first.params["task"]["align_version"] == 1
    assert s.aligner is not None
    base_loss = s.aligner.full_eval()
    for round in (1, 2, 3):
        metrics = one_round(s, round, {"a": 0.02 * round, "b": 0.05})
        saved = s.state()
        s.prepare()
    assert metrics["full_eval_loss"] != pytest.approx(base_loss, abs=1e-3)
    return s, saved, metrics


def test_deltas_chain_and_the_whole_state_for_agents_far_behind(
    trained: tuple[FedbiotServer, Any, dict[str, float]],
) -> None:
    s = trained[0]
    assert s.copies.version == 4 and sorted(s.copies.deltas) == [3, 4]  # history 2
    assert s.copies.state is not None
    specs = {name: tuple(t.shape) for name, t in s.copies.state.items()}
    behind_one = s.copies._align_blob(3)
    assert behind_one is not None
    deltas = st.decode_align(behind_one, specs)
    assert deltas.kind == "deltas" and deltas.versions == [3, 4]
    assert deltas.shas == [s.copies.shas[3], s.copies.shas[4]]
    behind_three = s.copies._align_blob(1)  # delta 2 is no longer kept: the whole state
    assert behind_three is not None
    whole = st.decode_align(behind_three, specs)
    assert whole.kind == "state" and whole.versions == [4]
    assert all(torch.equal(whole.state[n], s.copies.state[n]) for n in specs)
    assert len(behind_one) < 0.6 * len(behind_three)  # one bf16 delta vs the fp32 state


def test_restart_keeps_the_emulator_and_recomputes_a_due_alignment_identically(
    trained: tuple[FedbiotServer, Any, dict[str, float]], tiny: tuple[Path, Path]
) -> None:
    a, (tensors, meta), _ = trained
    assert meta["fedbiot.pending"] == "2" and meta["fedbiot.version"] == "3"
    b = server(*tiny, history=2)
    b.restore(tensors, meta)
    b.prepare()
    assert b.copies.bundle_sha == a.copies.bundle_sha  # the bundle is rebuilt byte for byte
    assert b.copies.version == a.copies.version == 4 and a.copies.shas == b.copies.shas
    assert a.copies.state is not None and b.copies.state is not None
    assert all(torch.equal(a.copies.state[n], b.copies.state[n]) for n in a.copies.state)
    assert all(
        torch.equal(a.copies.deltas[4][n], b.copies.deltas[4][n]) for n in a.copies.deltas[4]
    )
    assert a.moments is not None and b.moments is not None and a.moments.t == b.moments.t == 12
    assert all(torch.equal(a.moments.v[n], b.moments.v[n]) for n in a.moments.v)
    assert all(torch.equal(a.global_state[n], b.global_state[n]) for n in a.global_state)


def test_full_eval_and_export_plug_the_adapter_into_the_full_model(
    trained: tuple[FedbiotServer, Any, dict[str, float]], tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    s, _, metrics = trained
    assert s.aligner is not None
    written = s.export(tmp_path / "adapter", base_model_name="tiny")
    config = json.loads(written["config"].read_text())
    assert config["layers_to_transform"] == [4, 5] and config["layers_pattern"] == "layers"
    peft_model = PeftModel.from_pretrained(bundle_io.load_full(tiny[0]), tmp_path / "adapter")
    adapted = {
        emu.layer_of(n + ".") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert adapted == {4, 5}
    # stock peft on the held-out public examples gives the server's full-model eval loss
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for row in s.aligner.held_rows:
            sample = s.aligner.samples[row]
            logits = peft_model(input_ids=torch.tensor([sample.input_ids])).logits[0, :-1]
            labels = torch.tensor(sample.labels[1:])
            keep = labels != -100
            ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            loss_sum, count = loss_sum + float(ce), count + int(keep.sum())
    assert metrics["full_eval_loss"] == pytest.approx(loss_sum / count, abs=2e-4)


def test_the_kl_term_trains_and_missing_public_data_is_a_config_error(
    trained: tuple[FedbiotServer, Any, dict[str, float]], tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    s = trained[0]
    assert s.aligner is not None and s.copies.state is not None
    state = dict(s.copies.state)
    hidden_only, _ = s.aligner.train(state, None, steps=1, batch_size=2, lr=1e-2, seed=3)
    with_kl, _ = s.aligner.train(state, None, steps=1, batch_size=2, lr=1e-2, seed=3, kl_weight=5.0)
    assert all(torch.isfinite(t).all() for t in with_kl.values())
    assert any(not torch.equal(hidden_only[n], with_kl[n]) for n in state)  # KL has a gradient
    with pytest.raises(ConfigError, match="public data"):
        FedbiotServer(PARAMS, MethodContext(model_dir=tiny[0], public_data=None))
    broken = FedbiotServer(PARAMS, MethodContext(model_dir=tiny[0], public_data=tmp_path / "no"))
    assert broken.admit("a", PROFILE) is not None  # starts the work in the background
    while broken._job is not None and broken._job.is_alive():
        time.sleep(0.05)
    with pytest.raises(ConfigError, match="cannot read the public data"):
        broken.admit("a", PROFILE)


def test_the_kl_loss_runs_the_student_once_and_equals_the_two_forward_loss(
    trained: tuple[FedbiotServer, Any, dict[str, float]],
) -> None:
    """With the KL term on, one student forward gives both the hidden states the alignment
    matches and the logits the KL compares: the same loss and gradients as computing them in
    two forwards (as before), with the emulator run once."""
    a = trained[0].aligner
    assert a is not None and trained[0].copies.state is not None
    a.load_state(dict(trained[0].copies.state))
    rows = a.train_rows[:2]
    params = [getattr(w, x) for w in a.wrappers.values() for x in ("A", "B")]
    first = a.student.model.layers[0]
    calls: list[int] = []
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        loss = a._loss(rows, 0.5)
        loss.backward()
        one = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        assert len(calls) == 1
        for p in params:
            p.grad = None
        # the two-forward computation
        ids, mask = a._inputs(rows)
        body = a.student.model
        s = align._hidden_into(body, body.layers[a.plan.n_emulator], ids, mask)
        logits_s = a.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert len(calls) == 3
        t, _ = align._pad_hidden([a.teacher[i] for i in rows])
        valid = mask.bool()
        ref = ((t - s).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12))[valid].mean()
        with torch.no_grad():
            logits_t = a.tail(inputs_embeds=t, attention_mask=mask, use_cache=False).logits
        log_t = torch.nn.functional.log_softmax(logits_t[valid].float(), -1)
        log_s = torch.nn.functional.log_softmax(logits_s[valid].float(), -1)
        kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        ref = ref + 0.5 * kl
        ref.backward()
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        for g, p in zip(one, params, strict=True):
            assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-8)  # type: ignore[arg-type]
        assert any(float(g.abs().sum()) > 0 for g in one)
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None


class Engine:
    """The round engine with a FedBiOT server and two simulated agents."""

    def __init__(self, state_dir: Path, method: FedbiotServer) -> None:
        self.method = method
        raw = {
            "server": {"state_dir": str(state_dir), "heartbeat_interval": 1.0, "liveness": 3},
            "security": {"insecure": True},
            "run": {
                "run_id": "run-t",
                "method": "fedbiot",
                "rounds": 2,
                "min_agents": 2,
                "eval": False,
                "model_sha256": SHA,
                "round_deadline_s": 60.0,
            },
            "method": PARAMS,
        }
        self.clock = Clock()
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        self.summaries: list[RoundSummary] = []
        self.engine = RoundEngine(
            build_config(raw),
            method,
            MODEL,
            ledger=self.ledger,
            store=CheckpointStore(state_dir / "checkpoints"),
            clock=self.clock,
            on_round=self.summaries.append,
        )
        self.engine.start()

    def send(self, agent: str, header: Any, blobs: dict[str, bytes] | None = None) -> list[Any]:
        return self.engine.on_message(agent, decode(encode(header, blobs)), self.clock.now)

    def next_phase(self) -> dict[str, TaskAssign]:
        """Tick until the engine assigns. The method's background work (build, alignment) takes
        real time: the test waits for that thread itself, not for a wall-clock budget, and the
        engine's clock moves only 0.1 s a tick, so a slow, loaded machine never lets the agents'
        liveness (3 s of the engine's clock without a heartbeat) run out meanwhile."""
        for _ in range(10):
            self.clock.now += 0.1
            out = assigns(self.engine.tick(self.clock.now))
            if out:
                return out
            job = self.method._job
            if job is not None:
                job.join()
        raise AssertionError("no phase opened")


def test_engine_sends_the_bundle_once_and_small_deltas_after(
    tiny: tuple[Path, Path], prepared: FedbiotServer, tmp_path: Path
) -> None:
    s = server(*tiny)
    h = Engine(tmp_path, s)
    h.send("a", Hello(agent_id="a", versions=[1], profile=PROFILE, models=[SHA]))
    holds = [prepared.copies.bundle_sha]  # b kept the bundle from an earlier run of the same model
    h.send("b", Hello(agent_id="b", versions=[1], profile=PROFILE, models=[SHA], holds=holds))
    # building: the phase waits, the loop does not; a passing wait, not a refusal
    assert isinstance(s.admit("a", PROFILE), Waiting)  # (test_admission: not a block)
    for round in (1, 2):
        tasks = h.next_phase()
        for agent, fill in (("a", 0.1), ("b", 0.3)):
            blob = update_blob(s, round, fill)
            header = TaskResult(
                run_id=tasks[agent].run_id,
                round=round,
                task_id=tasks[agent].task_id,
                agent_id=agent,
                method="fedbiot",
                num_examples=8,
            )
            h.send(agent, header, {"update": blob})
        h.clock.now += 0.1
        h.engine.tick(h.clock.now)
    one, two = h.summaries
    bundle = len(s.copies.bundle)
    assert int(one.per_agent["a"]["down"]) > bundle > 50 * int(one.per_agent["b"]["down"])
    assert (
        one.per_agent["a"]["emulator"].startswith("sent") and "emulator" not in one.per_agent["b"]
    )
    assert one.method["bundle_sent"] == 1 and two.method["bundle_sent"] == 0
    assert one.method["align_version"] == 1 and two.method["align_version"] == 2
    for agent in ("a", "b"):  # round 2: the global adapter and one alignment delta
        assert int(two.per_agent[agent]["down"]) < bundle / 50
        assert two.per_agent[agent]["align"] == "v1→v2"
    assert two.method["align_KB_sent"] == pytest.approx(2 * two.method["align_delta_KB"], rel=0.01)
    # a restarted agent that kept both objects is sent neither (its Hello lists them)
    s.on_hello(
        AgentView(
            "a", PROFILE, holds=frozenset({s.copies.bundle_sha, s.copies.shas[s.copies.version]})
        )
    )
    assert set(s.assign(2, "a", "eval").blobs) == {spec.GLOBAL_BLOB}
    s.on_hello(AgentView("a", PROFILE, holds=frozenset()))  # and one that lost them gets both
    assert set(s.assign(2, "a", "eval").blobs) == {
        spec.GLOBAL_BLOB,
        spec.EMULATOR_BLOB,
        spec.ALIGN_BLOB,
    }
    h.ledger.close()
