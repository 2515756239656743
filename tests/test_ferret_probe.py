"""The one-round Ferret probe (benchmarks/_ferret_probe.py) on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._ferret_probe import probe
from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example

DATA = {
    "a": [Example("Capital of France?", "Paris"), Example("Say hello.", "hello hello")] * 2,
    "b": [Example("Two plus two?", "four"), Example("Capital of Italy?", "Rome")] * 3,
}
PARAMS = {
    "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32},
    "ferret": {"clip_norm": 1e6},  # no clip: the step's noise is then sqrt(d / n) times |Δ|
}


def test_probe_compares_the_true_update_with_the_rebuilt_step(
    tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    model, tokenizer = load_base(tiny_resolved, "fp32", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = DATA["a"] + DATA["b"]  # evaluated on what they trained on: the true Δ must help
    rows = probe(tiny_model_dir, model, tokenizer, DATA, seen, [2, 32], PARAMS)
    assert [r.label for r in rows] == ["before", "true", "K=2", "K=32"]
    true, k2, k32 = rows[1], rows[2], rows[3]
    assert true.drop > 0 and true.cosine == pytest.approx(1.0, abs=1e-9)
    for r in (k2, k32):
        assert r.norm_ratio > 1.0  # the rebuilt step is Δ̄ plus noise
        assert r.loss == r.loss and r.triples > 0
    assert k32.norm_ratio < k2.norm_ratio / 2  # more seeds, less noise (4x in theory)
    for n, p in model.named_parameters():  # the probe leaves the model as it found it
        assert p.data.equal(before[n])
