"""Ferret runs reproduce bit for bit from the same flags (whatever the run and task ids)."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_agent.model.store import ResolvedModel, load_base
from edge_agent.training.data import Example
from tests.helpers.ferret_harness import FerretHarness

PARAMS = {
    "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "max_len": 32},
    "ferret": {"k": 6},
}
DATA = {
    "a": [Example("Capital of France?", "Paris"), Example("Say hello.", "hello hello")],
    "b": [Example("Two plus two?", "four"), Example("Capital of Italy?", "Rome")] * 2,
}


def run(
    state: Path, model_dir: Path, resolved: ResolvedModel, seed: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    run_id = f"run-{state.name}"  # a fresh run id per run, so fresh task ids
    h = FerretHarness(
        state, model_dir, resolved, DATA, params=PARAMS, rounds=2, seed=seed, run_id=run_id
    )
    try:
        weights = {n: t.clone() for n, t in h.run().items()}
        assert [s.round for s in h.summaries] == [1, 2]
        return weights, h.task_ids
    finally:
        h.close()


def test_two_runs_with_the_same_flags_give_bit_identical_globals(
    tmp_path: Path, tiny_model_dir: Path, tiny_resolved: ResolvedModel
) -> None:
    first, ids_1 = run(tmp_path / "1", tiny_model_dir, tiny_resolved, seed=3)
    again, ids_2 = run(tmp_path / "2", tiny_model_dir, tiny_resolved, seed=3)
    assert len(ids_1) == len(ids_2) == 4 and not set(ids_1) & set(ids_2)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    base, _ = load_base(tiny_resolved, "fp32", device="cpu")
    moved = {n: not torch.equal(p.data, first[n]) for n, p in base.named_parameters()}
    assert all(moved.values())  # every group took a step
    other, _ = run(tmp_path / "3", tiny_model_dir, tiny_resolved, seed=4)
    assert all(not torch.equal(first[n], other[n]) for n in first)  # the run seed matters
