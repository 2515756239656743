"""`edgefed-aggregator report`: PNG plots and an HTML page from a ledger the round engine wrote."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main
from aggregator.errors import StateError
from aggregator.ops.report import collect, write_report
from aggregator.store.ledger import Ledger
from protocol import payloads
from protocol.messages import TaskAssign, TaskResult

AGENTS = ["edge-1", "edge-2"]
EXAMPLES = {"edge-1": 10, "edge-2": 30}
ROUNDS = 3


def train_loss(agent: str, round: int) -> float:
    return 2.0 - 0.3 * round - 0.1 * AGENTS.index(agent)


def eval_em(agent: str, round: int) -> float:
    return 0.1 * round + 0.05 * AGENTS.index(agent)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three rounds of two agents through the real engine: train, commit, evaluate."""
    from engine_harness import Harness, assigns, lora_state, start_round

    state = tmp_path_factory.mktemp("state")
    h = Harness(state, eval=True, eval_initial=False, rounds=ROUNDS)

    def reply(a: TaskAssign, agent: str, metrics: dict[str, float], n: int) -> None:
        blobs = None
        if a.kind == "train":
            value = float(a.round + AGENTS.index(agent))
            blobs = {
                "update": payloads.encode_lora(lora_state(value), method="fedit", round=a.round)
            }
        header = TaskResult(
            run_id=a.run_id,
            round=a.round,
            task_id=a.task_id,
            agent_id=agent,
            method="fedit",
            kind=a.kind,
            num_examples=n,
            metrics=metrics,
        )
        h.send(agent, header, blobs)

    tasks = start_round(h, AGENTS)
    for r in range(1, ROUNDS + 1):
        assert {t.kind for t in tasks.values()} == {"train"} and set(tasks) == set(AGENTS)
        for agent, a in tasks.items():
            reply(a, agent, {"train_loss": train_loss(agent, r)}, EXAMPLES[agent])
        evals = assigns(h.tick())
        assert {t.kind for t in evals.values()} == {"eval"}
        for agent, a in evals.items():
            reply(a, agent, {"eval_loss": 1.9 - 0.25 * r, "eval_em": eval_em(agent, r)}, 8)
        tasks = assigns(h.tick()) or assigns(h.tick())
    assert h.engine.finished
    h.close()
    return state


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_collect_reads_rounds_updates_and_metrics(state_dir: Path) -> None:
    with Ledger(state_dir / "ledger.sqlite") as ledger:
        report = collect(ledger)
    assert (report.run_id, report.method) == ("run-t", "fedit")
    assert [r.round for r in report.rounds] == [1, 2, 3]
    assert report.agents == AGENTS
    assert len(report.updates) == 6 and report.rejected == {}
    rounds, losses = report.series("train_loss")
    assert rounds == [1, 2, 3]
    for r, loss in zip(rounds, losses, strict=True):  # example-weighted: 10 and 30 examples
        expected = (10 * train_loss("edge-1", r) + 30 * train_loss("edge-2", r)) / 40
        assert loss == pytest.approx(expected, abs=1e-12)
    _, ems = report.series("eval_em")
    assert ems == pytest.approx([(eval_em("edge-1", r) + eval_em("edge-2", r)) / 2 for r in rounds])
    for u in report.updates:
        assert u.bytes_up > 1000 and u.metrics["train_loss"] == train_loss(u.agent_id, u.round)
    # round 1's task carries no adapter (agents build it from the seed); round 2's does
    down = {(u.round, u.agent_id): u.bytes_down for u in report.updates}
    for agent in AGENTS:
        assert 0 < down[1, agent] < 1000 < down[2, agent]


def test_report_writes_three_pngs_and_a_page_naming_every_round(
    state_dir: Path, tmp_path: Path
) -> None:
    files = write_report(state_dir, tmp_path / "report")
    images = {}
    for path in (files.loss, files.eval, files.bytes):
        data = path.read_bytes()
        width, height = png_size(data)
        assert (width, height) == (700, 380), path.name
        assert len(data) > 5000, path.name  # a drawn plot, not an empty canvas
        images[path.name] = data
    page = files.html.read_text(encoding="utf-8")
    for r in range(1, ROUNDS + 1):
        assert f'<tr id="round-{r}"><th scope="row">{r}</th>' in page
    assert page.count('<tr id="round-') == ROUNDS
    for agent in AGENTS:
        assert page.count(f'<td class="text">{agent}</td>') == ROUNDS
    # round 1's weighted train loss, 4 decimals, as the status table prints it
    assert f"<td>{(10 * 1.7 + 30 * 1.6) / 40:.4f}</td>" in page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(images.values())
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_command(state_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["report", "--state-dir", str(state_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"report: {out / 'index.html'}"
    assert sorted(p.name for p in out.iterdir()) == [
        "bytes.png",
        "eval.png",
        "index.html",
        "loss.png",
    ]


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", "--state-dir", str(tmp_path), "--out", "x"])
    assert result.exit_code == 2
    assert result.output.strip() == f"edgefed-aggregator: {tmp_path}: no ledger here " + (
        "(is this the aggregator's state_dir?)"
    )
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.create_run("empty", "fedit", {})
    with pytest.raises(StateError, match="run 'empty' has no rounds yet"):
        write_report(tmp_path, tmp_path / "out")
    with pytest.raises(StateError, match="no record of run 'nope'"):
        write_report(tmp_path, tmp_path / "out", run_id="nope")
    assert not (tmp_path / "out").exists()
