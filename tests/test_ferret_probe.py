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


def _write_split(path: Path, seed: int, budget: int) -> None:
    import json

    path.mkdir()
    rows = {
        "agent-0": [("Capital of France?", "Paris"), ("Say hello.", "hello hello")] * 2,
        "agent-1": [("Two plus two?", "four"), ("Capital of Italy?", "Rome")] * 3,
        "eval": [("Capital of Spain?", "Madrid"), ("Three plus one?", "four")],
    }
    for name, pairs in rows.items():
        lines = [json.dumps({"instruction": q, "output": a}) for q, a in pairs]
        (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = {"format": "edgefed-split/1", "seed": seed, "budget_tokens": budget}
    (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def test_a_prepared_split_gives_the_probe_its_agents_eval_seed_and_max_len(tmp_path: Path) -> None:
    from benchmarks._ferret_probe import load_split

    _write_split(tmp_path / "seed-3", seed=3, budget=40)
    split = load_split(tmp_path / "seed-3", agents=2)
    assert list(split.data) == ["agent-1", "agent-2"]  # the names `local` gives its agents
    assert [len(v) for v in split.data.values()] == [4, 6]
    assert [e.response for e in split.eval_examples] == ["Madrid", "four"]
    assert split.seed == 3 and split.max_len == 40 + 32  # the template's room, as `local` adds
    with pytest.raises(SystemExit, match="agent-2.jsonl"):
        load_split(tmp_path / "seed-3", agents=3)


def test_the_probe_runs_on_a_prepared_split_with_its_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import _ferret_probe

    seen: list[dict[str, object]] = []
    real = _ferret_probe.probe

    def spy(*args: object, **kw: object) -> object:
        seen.append(args[6])  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_ferret_probe, "probe", spy)
    _write_split(tmp_path / "s", seed=5, budget=24)
    rows = _ferret_probe.print_probe(
        quick=True, ks=[2], agents=2, steps=1, lr=0.05, split_dir=tmp_path / "s"
    )
    assert [r.label for r in rows] == ["before", "true", "K=2"]
    assert seen[0]["ferret"] == {"seed": 5} and seen[0]["train"]["max_len"] == 56  # type: ignore[index]
    assert "2 held-out examples of" in capsys.readouterr().out


def test_shares_of_the_true_drop_are_summarised_per_k(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks._ferret_probe import ProbeRow
    from benchmarks.ferret_k import print_shares

    def rows(true_drop: float, k_drop: float) -> list[ProbeRow]:
        return [
            ProbeRow("before", 2.0, 0.0, 1.0, 1.0, 0),
            ProbeRow("true", 2.0 - true_drop, true_drop, 1.0, 1.0, 0),
            ProbeRow("K=8", 2.0 - k_drop, k_drop, 0.1, 9.0, 16),
        ]

    print_shares([rows(1.0, 0.9), rows(0.5, 0.5)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("K=8"))
    assert "0.950 ± 0.071" in line and "(0.900 / 1.000)" in line
