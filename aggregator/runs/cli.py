"""``edgefed-aggregator runs submit | list | stop | show`` (over the admin socket of a running
``serve``) and the run and service state that ``status`` shows (read from the ledger)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from aggregator.errors import AggregatorError
from aggregator.store.ledger import Ledger


def _fail(message: str) -> None:
    click.echo(f"edgefed-aggregator: {message}", err=True)
    sys.exit(2)


def _call(state_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    from aggregator.runs.admin_client import call

    try:
        reply = call(state_dir, request)
    except AggregatorError as exc:
        _fail(str(exc))
    if not reply.get("ok"):
        _fail(str(reply.get("error", "the aggregator refused the request")))
    return reply


STATE_DIR = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The state dir of the running `serve` (its admin socket is there).",
)


@click.group()
def runs() -> None:
    """Submit, list, stop, resume and show the runs of a running `serve`."""


@runs.command()
@STATE_DIR
@click.argument("run_file", type=click.Path(path_type=Path, dir_okay=False))
def submit(state_dir: Path, run_file: Path) -> None:
    """Queue the run of RUN_FILE (its [run] and [method] tables)."""
    try:
        text = run_file.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{run_file}: cannot read: {exc.strerror or exc}")
    reply = _call(
        state_dir,
        {
            "op": "submit",
            "toml": text,
            "source": str(run_file),
            "base": str(run_file.resolve().parent),
        },
    )
    ahead = int(reply.get("ahead", 0))
    click.echo(f"submitted run {reply['run_id']} ({ahead} ahead of it)")


@runs.command("list")
@STATE_DIR
@click.option("--json", "as_json", is_flag=True)
def list_(state_dir: Path, as_json: bool) -> None:
    """Every run of the service, oldest first, with its status."""
    reply = _call(state_dir, {"op": "list"})
    if as_json:
        click.echo(json.dumps(reply["runs"], indent=2))
        return
    click.echo(f"{'run':<24} {'method':<8} {'status':<9} {'since':<19} reason")
    for r in reply["runs"]:
        click.echo(
            f"{r['run_id']:<24} {r['method']:<8} {r['status']:<9} {_when(r['changed_at']):<19} "
            f"{r['reason']}"
        )


@runs.command()
@STATE_DIR
@click.argument("run_id")
def stop(state_dir: Path, run_id: str) -> None:
    """Stop RUN_ID: a queued run leaves the queue; the active run ends now (its committed
    rounds stay, and the next queued run starts)."""
    reply = _call(state_dir, {"op": "stop", "run_id": run_id})
    click.echo(f"run {run_id}: {reply['run']['status']}")


@runs.command()
@STATE_DIR
@click.argument("run_id")
def resume(state_dir: Path, run_id: str) -> None:
    """Queue a failed or stopped RUN_ID again: in its turn it resumes after its last committed
    round (the rounds it committed stay)."""
    reply = _call(state_dir, {"op": "resume", "run_id": run_id})
    click.echo(f"run {run_id}: {reply['run']['status']}")


@runs.command()
@STATE_DIR
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def show(state_dir: Path, run_id: str, as_json: bool) -> None:
    """Status, what it waits for, and the rounds of RUN_ID."""
    reply = _call(state_dir, {"op": "show", "run_id": run_id})
    if as_json:
        click.echo(json.dumps(reply, indent=2, default=str))
        return
    run = reply["run"]
    click.echo(f"run {run['run_id']}  method {run['method']}  {run['status']}  {run['reason']}")
    for line in describe_state({"lifecycle": run, "service": reply.get("service")}):
        click.echo(line)
    blocked = (reply.get("live") or {}).get("blocked")
    if blocked:
        click.echo(f"  cannot start: {blocked}")
    for r in reply["rounds"]:
        loss = r.get("train_loss")
        click.echo(
            f"  round {r['round']}: {'committed' if r['committed'] else 'open'}"
            + (f", train loss {loss:.4f}" if loss is not None else "")
        )


def run_state(ledger: Ledger, state_dir: Path, run_id: str | None) -> dict[str, Any]:
    """What ``status`` adds about a run: its lifecycle, the service state, the round-0
    baseline and each agent's latest evaluation."""
    if run_id is None:
        return {"lifecycle": None, "service": None, "baseline": None, "agent_evals": {}}
    from aggregator.runs.state import SERVICE, RunBook

    return {
        "lifecycle": RunBook(ledger, state_dir).info(run_id).as_json(),
        "service": ledger.get_state(run_id, SERVICE),
        "baseline": ledger.get_state(run_id, "baseline"),
        "agent_evals": ledger.get_state(run_id, "agent_evals", {}),
    }


def describe_state(data: dict[str, Any]) -> list[str]:
    """Human lines for the lifecycle, service state, baseline and per-agent evaluations."""
    lines: list[str] = []
    life = data.get("lifecycle")
    if life:
        why = f" ({life['reason']})" if life.get("reason") else ""
        lines.append(f"  status: {life['status']}{why} since {_when(life['changed_at'])}")
    service = data.get("service")
    if service and (not life or life["status"] == "running"):
        agents = f": {', '.join(service['agents'])}" if service.get("agents") else ""
        lines.append(
            f"  now: {service['state']} {service['detail']}{agents} since {_when(service['since'])}"
        )
    baseline = data.get("baseline")
    if baseline:
        lines.append("  round-0 baseline: " + _metrics(baseline))
    for agent_id, ev in sorted((data.get("agent_evals") or {}).items()):
        lines.append(f"  {agent_id} last eval (round {ev.get('round')}): " + _metrics(ev))
    return lines


def _metrics(m: dict[str, Any]) -> str:
    keys = [k for k in ("eval_loss", "eval_em", "eval_rougeL") if k in m]
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys) or "-"


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
