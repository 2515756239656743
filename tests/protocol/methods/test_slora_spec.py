"""SLoRA wire spec: parameters, the masks both halves derive, and the exact stage-1 payload size."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors_format as st_format
import torch

from protocol import payloads, randomness
from protocol.methods import NAMES, BadParams, parse_params
from protocol.methods.slora import spec

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "randomness-v1.json"
Q0 = "model.layers.0.self_attn.q_proj.weight"
TARGETS = ("q_proj", "v_proj")


def test_defaults_and_registration() -> None:
    assert "slora" in NAMES
    p = parse_params("slora", {})
    assert isinstance(p, spec.Params)
    assert p.stage == 1
    assert (p.sparse.stage1_rounds, p.sparse.density, p.sparse.mask_seed) == (2, 0.01, None)
    assert p.sparse.lr is None and p.lora.r == 8
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert p.sparse.target_modules == linear and p.lora.target_modules == linear
    assert (p.sparse.init, p.sparse.lr_scale, p.switch_eval) == ("svd", 10.0, False)


def test_stage1_lr_is_train_lr_times_the_scale_unless_set() -> None:
    p = parse_params("slora", {"train": {"lr": 2e-4}})
    assert isinstance(p, spec.Params)
    assert p.sparse.stage1_lr(p.train.lr) == pytest.approx(2e-3)
    q = parse_params("slora", {"train": {"lr": 2e-4}, "sparse": {"lr_scale": 3, "lr": 0.05}})
    assert isinstance(q, spec.Params) and q.sparse.stage1_lr(q.train.lr) == 0.05


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sparse": {"density": 0.0}}, "sparse.density"),
        ({"sparse": {"density": 1.5}}, "sparse.density"),
        ({"sparse": {"stage1_rounds": 0}}, "sparse.stage1_rounds"),
        ({"sparse": {"mask_seed": -1}}, "sparse.mask_seed"),
        ({"stage": 3}, "stage"),
        ({"lora": {"rank_pattern": {"q_proj": 4}}}, "rank_pattern must be"),
        ({"sparse": {"target_modules": ["q_proj"]}}, "not in sparse.target_modules"),
        ({"sparse": {"init": "zeros"}}, "sparse.init"),
        ({"sparse": {"lr_scale": 0}}, "sparse.lr_scale"),
        ({"sparse": {"dense": True}}, "sparse.dense"),
    ],
)
def test_bad_params_are_named(params: dict[str, Any], message: str) -> None:
    with pytest.raises(BadParams, match=message):
        parse_params("slora", params)


def test_stage1_quantization_is_never_quantized() -> None:
    assert [spec.stage1_quant(q) for q in ("nf4", "int8", "bf16", "fp32")] == [
        "fp32",
        "fp32",
        "bf16",
        "fp32",
    ]


def test_agent_and_server_masks_are_identical_and_the_spec_reference(
    tiny_resolved: Any, tiny_model_dir: Path
) -> None:
    from aggregator.methods._targets import target_shapes
    from aggregator.methods.slora.math import mask_of
    from edge_agent.methods.slora.client import sparse_masks, sparse_targets
    from edge_agent.model.store import load_base

    model, _ = load_base(tiny_resolved, "fp32", device="cpu")
    agent = sparse_masks(sparse_targets(model, TARGETS), 0, 0.01)
    shapes = target_shapes(tiny_model_dir, TARGETS)
    assert agent.keys() == shapes.keys() and len(agent) == 4
    for name, shape in shapes.items():
        assert torch.equal(agent[name], mask_of(0, name, math.prod(shape), 0.01))
    cases = json.loads(REFERENCE.read_text(encoding="utf-8"))["cases"]
    case = next(c for c in cases if c["seed"] == 0 and c["name"] == Q0)
    assert shapes[Q0] == (64, 64)  # 4096 elements, as the reference case
    assert agent[Q0].tolist() == case["mask_n4096_density_0.01"]


def test_stage1_payload_is_values_only_plus_a_fixed_header() -> None:
    """The tiny model's q_proj/v_proj at 1%: 46 + 22 + 56 + 17 = 141 values, no indices."""
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.self_attn.v_proj.weight": (32, 64),
        "model.layers.1.self_attn.q_proj.weight": (64, 64),
        "model.layers.1.self_attn.v_proj.weight": (32, 64),
    }
    counts = {
        n: randomness.mask_count(randomness.stream_key(0, n), math.prod(s), 0.01)
        for n, s in shapes.items()
    }
    assert sum(counts.values()) == 141
    # the header the safetensors format asks for: the masks' metadata, one F32 vector of
    # values per matrix, no index anywhere
    meta = {"edgefed.density": "0.01", "edgefed.kind": "masked", "edgefed.method": "slora",
            "edgefed.randomness": "1", "edgefed.round": "1", "edgefed.seed": "0",
            "edgefed.shapes": json.dumps({n: list(s) for n, s in shapes.items()},
                                         separators=(",", ":"))}  # fmt: skip
    header = st_format.header_json(meta, {n: ("F32", [c], 4 * c) for n, c in counts.items()})
    header_bytes = st_format.header_frame_nbytes(header)
    for fill in (0.0, 1.5):
        values = {n: torch.full((c,), fill) for n, c in counts.items()}
        blob = payloads.encode_masked(values, shapes, seed=0, density=0.01, method="slora", round=1)
        decoded = payloads.decode(blob, payloads.Expect(shapes=shapes, seed=0, density=0.01))
        assert decoded.raw_nbytes == 4 * 141 == 564
        parsed, parsed_bytes = st_format.parse(blob)
        assert parsed == header
        assert decoded.header_nbytes == parsed_bytes == header_bytes
        assert len(blob) == header_bytes + 564  # values and header, nothing else
