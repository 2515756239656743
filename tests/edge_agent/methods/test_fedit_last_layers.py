"""FedIT restricted to the last decoder layers (``last_layers``, FedBiOT's baseline of the same
trainable capacity), both halves on the tiny 2-layer Llama: the agent adapts and sends layer 1
only, the server expects exactly that layout, and the export loads into stock peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.errors import ConfigError, UpdateRejected
from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.methods import MethodContext
from aggregator.methods.fedit.server import FeditServer
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.fedit.client import FeditClient
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example, load_jsonl
from protocol import payloads
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params

PARAMS: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"steps": 2, "batch_size": 2, "max_len": 48, "lr": 1e-2},
    "eval": {"max_len": 48, "batch_size": 4, "exact_match": False, "max_examples": 4},
    "last_layers": 1,
}
LAYER1 = "base_model.model.model.layers.1.self_attn."


class Workspace:
    def __init__(self, resolved: ResolvedModel, data: Path) -> None:
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        examples = load_jsonl(data)
        self.train_examples: list[Example] = examples[:8]
        self.eval_examples: list[Example] = examples[8:12]
        self.progress = False
        self._base: tuple[Any, Any] | None = None

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        if self._base is None:
            self._base = load_base(self.resolved, "fp32", device="cpu")
        return self._base

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


def run(ws: Workspace, params: dict[str, Any], blobs: Any, round: int, kind: str) -> TaskOutput:
    assign = TaskAssign(
        run_id="run-t", round=round, task_id=f"r{round}-{kind}", kind=kind,  # type: ignore[arg-type]
        method="fedit", model=BaseModelRef(name="tiny", sha256=ws.resolved.sha256), quant="fp32",
        params=params,
    )  # fmt: skip
    task = TaskInput(
        assign=assign,
        params=parse_params("fedit", params),
        blobs={k: memoryview(v) for k, v in blobs.items()},
    )
    return FeditClient().run(task, ws)


def result(agent: str, n: int) -> TaskResult:
    return TaskResult(
        run_id="run-t", round=1, task_id=f"r1-{agent}", agent_id=agent, method="fedit",
        num_examples=n, metrics={"train_loss": 1.0},
    )  # fmt: skip


def test_fedit_on_the_last_layer_only_end_to_end(
    tiny_resolved: ResolvedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    files = write_demo(tmp_path / "data", make_demo_split(1, per_agent=12, n_eval=4, n_public=4))
    s = FeditServer(PARAMS, MethodContext(model_dir=tiny_model_dir))
    expect = s._expect(1).tensors
    assert expect is not None and sorted(expect) == [
        LAYER1 + "q_proj.lora_A.weight", LAYER1 + "q_proj.lora_B.weight",
        LAYER1 + "v_proj.lora_A.weight", LAYER1 + "v_proj.lora_B.weight",
    ]  # fmt: skip
    ws = Workspace(tiny_resolved, files["agent-0"])
    a = s.assign(1, "a", "train")
    out = run(ws, a.params, a.blobs, 1, "train")
    update = payloads.decode(out.blobs["update"]).tensors
    assert set(update) == set(expect)
    assert update[LAYER1 + "q_proj.lora_B.weight"].abs().sum() > 0  # it trained
    s.begin_round(1)
    s.add(s.validate(1, result("a", out.num_examples), {"update": memoryview(out.blobs["update"])}))
    # an adapter on every layer (plain fedit's) is not this task's layout
    wide = {k.replace("layers.1.", "layers.0."): v for k, v in update.items()} | update
    blob = payloads.encode_lora(wide, method="fedit", round=1)
    with pytest.raises(UpdateRejected):
        s.validate(1, result("b", 4), {"update": memoryview(blob)})
    s.finish_round(1)

    s.export(tmp_path / "adapter", base_model_name=str(tiny_model_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    evaluated = run(ws, s.assign(1, "a", "eval").params, s.assign(1, "a", "eval").blobs, 1, "eval")
    peft_model = ws.cache["adapter"][1]
    stock = PeftModel.from_pretrained(
        load_base(tiny_resolved, "fp32", device="cpu")[0], str(tmp_path / "adapter")
    )
    lora_names = {n for n, _ in stock.named_parameters() if "lora_" in n}
    assert lora_names and all(".layers.1." in n for n in lora_names)
    ids = torch.arange(100, 124).reshape(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            stock(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    assert evaluated.metrics["eval_loss"] > 0


def test_more_layers_than_the_model_has_is_a_config_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot adapt the last 3"):
        FeditServer({**PARAMS, "last_layers": 3}, MethodContext(model_dir=tiny_model_dir))
