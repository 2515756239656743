"""`edgefed-aggregator local --method fedbiot` on a tiny 6-layer model: every evaluation row is the
full model with the adapter plugged back, and the emulator's loss rides beside it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from aggregator.local.options import LocalOptions
from aggregator.local.run import run_local
from aggregator.store.ledger import Ledger
from tests.aggregator.methods.test_fedbiot_server import make_tiny

pytestmark = pytest.mark.slow


def test_local_fedbiot_scores_the_full_model_every_round(
    tmp_path: Path, embedded_tokenizer: Any
) -> None:
    model, _ = make_tiny(tmp_path, embedded_tokenizer)
    params = {
        "align": {"initial_steps": 4, "steps": 2, "max_len": 64, "holdout": 8},
        "eval": {"max_len": 64, "max_new_tokens": 3, "max_examples": 6},
        "train": {"max_len": 64},
    }
    options = LocalOptions(
        method="fedbiot", agents=2, rounds=1, workdir=tmp_path / "run", model=str(model),
        alpha=0.5, per_agent=8, steps=2, batch_size=2, lr=1e-3, rank=4, quant="fp32",
        insecure=True, merge=False, seed=0, eval_examples=6, method_params=params,
    )  # fmt: skip
    out = io.StringIO()
    result = run_local(options, out)
    rows = {r["round"]: r for r in result["rows"]}
    assert sorted(rows) == [0, 1]
    for r in rows.values():  # the full model's columns, the emulator's loss beside them
        assert 0 < r["eval_loss"] < 20 and 0 < r["emulator_eval_loss"] < 20
        assert "eval_rouge_l" in r
        assert abs(r["eval_loss"] - r["emulator_eval_loss"]) > 1e-3
    assert "emulator_eval_loss=" in out.getvalue()  # the local table prints it
    with Ledger(tmp_path / "run" / "state" / "ledger.sqlite") as ledger:
        run = ledger.latest_run()
        assert run is not None
        evals = ledger.evals(run)
    assert all("emulator_eval_loss" in e["aggregate"] for e in evals)
