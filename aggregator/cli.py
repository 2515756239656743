"""``edgefed-aggregator``: serve, local, status, export, report, keygen, config check."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from aggregator.errors import AggregatorError
from protocol.cli_common import ToolGroup, fail, keygen_command, private_umask
from protocol.logformat import FORMATS, LogFormat, configure
from protocol.methods import NAMES

log = logging.getLogger("aggregator")


def _logging(verbose: int, log_format: LogFormat = "text") -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    configure(level, log_format, "%(asctime)s %(levelname)s %(name)s: %(message)s")


TOOL = "edgefed-aggregator"


def _fail(message: str) -> None:
    fail(TOOL, message)


@click.group(
    cls=ToolGroup,
    tool=TOOL,
    user_errors=(AggregatorError,),
    context_settings={
        "auto_envvar_prefix": "EDGEFED_AGGREGATOR",
        "help_option_names": ["-h", "--help"],
    },
)
def main() -> None:
    """The edgefed aggregator service and tools."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--bind", default=None, help="Override server.bind.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--insecure", is_flag=True, default=None, help="Disable CURVE (not for production).")
@click.option(
    "--exit-when-done",
    is_flag=True,
    help="Exit (0) once no run is active or queued, instead of waiting for the next one.",
)
@click.option(
    "--metrics-port", type=int, default=None, help="Override server.metrics_port (Prometheus)."
)
@click.option("-v", "--verbose", count=True)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Log lines as text, or as JSON objects (one per line).",
)
def serve(
    config_path: Path,
    bind: str | None,
    state_dir: Path | None,
    insecure: bool | None,
    exit_when_done: bool,
    metrics_port: int | None,
    verbose: int,
    log_format: LogFormat,
) -> None:
    """Run the aggregator service from a TOML config, until SIGTERM.

    The config's [run] is the first run; more are queued with `runs submit` and run one after
    the other. Agents stay connected between runs. It works under umask 0077: the state dir,
    ledger, checkpoints and exports it creates are readable by its user only."""
    _logging(max(verbose, 1), log_format)
    with private_umask():
        _serve(config_path, bind, state_dir, insecure, exit_when_done, metrics_port)


def _serve(
    config_path: Path,
    bind: str | None,
    state_dir: Path | None,
    insecure: bool | None,
    exit_when_done: bool,
    metrics_port: int | None,
) -> None:
    from aggregator.engine.service import AggregatorService
    from aggregator.errors import DiskFull
    from aggregator.ops.config import load_config
    from aggregator.store.statedir import EXIT_DISK_FULL, wait_for_space

    try:
        config = load_config(
            config_path,
            {
                "server": {"bind": bind, "state_dir": state_dir, "metrics_port": metrics_port},
                "security": {"insecure": insecure},
            },
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            service = AggregatorService(
                config, _model_ref(config), serve_runs=True, exit_when_done=exit_when_done
            )
            service.should_exit = stop
            code = service.run()
        except DiskFull as exc:  # transient: wait for space, then exit to be restarted
            click.echo(f"edgefed-aggregator: {exc}", err=True)
            wait_for_space(config.server.state_dir, stop.is_set)
            sys.exit(EXIT_DISK_FULL)
        log.info("aggregator stopped")
    except AggregatorError as exc:
        _fail(str(exc))
    sys.exit(code)


def _model_ref(config: Any) -> Any:
    from protocol.messages import BaseModelRef

    sha = config.run.model_sha256
    if sha is None:
        if config.run.model_dir is None:
            raise AggregatorError("run.model_sha256 (or run.model_dir to hash) is required")
        from aggregator.store.modelhash import weights_sha256

        sha = weights_sha256(config.run.model_dir)
    return BaseModelRef(name=config.run.model, sha256=sha)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("-v", "--verbose", count=True)
def region(config_path: Path, verbose: int) -> None:
    """Run a regional tier: an aggregator for its agents, an agent of [upstream]."""
    from protocol.parent import die_with_parent

    die_with_parent()  # started by `edgefed-aggregator local --regions`: stop when it dies
    _logging(max(verbose, 1))
    from aggregator.ops.config import load_config
    from aggregator.tier.regional import run_region
    from edge_agent.errors import EdgeAgentError

    try:
        config = load_config(config_path)
        with private_umask():
            code = run_region(config, _model_ref(config))
    except (AggregatorError, EdgeAgentError) as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command()
@click.option("--method", default="fedit", show_default=True, type=click.Choice(list(NAMES)))
@click.option("--agents", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--workdir", type=click.Path(path_type=Path), default=Path("edgefed-local"), show_default=True
)
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option(
    "--alpha", default=0.5, show_default=True, help="Dirichlet concentration of the non-IID split."
)
@click.option("--per-agent", default=64, show_default=True, help="Training examples per agent.")
@click.option("--steps", default=12, show_default=True, help="Local steps per round.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option(
    "--quant", default="nf4", show_default=True, type=click.Choice(["nf4", "int8", "bf16", "fp32"])
)
@click.option("--eval-examples", default=48, show_default=True)
@click.option("--insecure", is_flag=True, help="Skip CURVE (local keys are made by default).")
@click.option("--merge", is_flag=True, help="Also export the adapter merged into the base.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--agent-limit",
    "agent_limits",
    multiple=True,
    metavar="AGENT:memory=SIZE,bandwidth=MBPS",
    help="Simulate a smaller agent, e.g. agent-2:memory=600MB,bandwidth=20 (repeatable).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method parameter, dotted, e.g. --param train.steps=4 (value read as JSON if it can).",
)
@click.option(
    "--regions",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Put the agents behind this many regional tiers (their own processes; 0: none).",
)
@click.option(
    "--secagg", is_flag=True, help="Secure aggregation: the aggregator sees only each round's sum."
)
@click.option(
    "--dp-epsilon",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Client-level DP: noise calibrated to reach this ε at the run's δ; stops there.",
)
@click.option(
    "--dp",
    "dp_mode",
    type=click.Choice(["central", "local"]),
    default="central",
    show_default=True,
    help="Where DP noise is added (with --dp-epsilon).",
)
@click.option(
    "--data",
    default="demo",
    show_default=True,
    help="demo (built-in synthetic set), natural-instructions (prepared in the workdir), or a "
    "directory written by `edgefed-aggregator data natural-instructions`.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT during the run (0: any free port); each "
    "agent serves its own on a free port (the URLs are printed).",
)
@click.option("-v", "--verbose", count=True)
def local(
    method: str,
    agents: int,
    rounds: int,
    workdir: Path,
    model: str,
    alpha: float,
    per_agent: int,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    quant: str,
    eval_examples: int,
    insecure: bool,
    merge: bool,
    seed: int,
    agent_limits: tuple[str, ...],
    params: tuple[str, ...],
    regions: int,
    secagg: bool,
    dp_epsilon: float | None,
    dp_mode: str,
    data: str,
    metrics_port: int | None,
    verbose: int,
) -> None:
    """The main job on one machine: aggregator + N agent processes on loopback."""
    _logging(verbose)
    from aggregator.local.options import (
        LocalOptions,
        local_privacy,
        parse_agent_limits,
        parse_params,
    )
    from aggregator.local.run import run_local

    try:
        limits = parse_agent_limits(agent_limits)
        method_params = parse_params(params)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None

    opts = LocalOptions(
        method=method,
        agents=agents,
        rounds=rounds,
        workdir=workdir,
        model=model,
        alpha=alpha,
        per_agent=per_agent,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        rank=rank,
        quant=quant,
        insecure=insecure,
        merge=merge,
        seed=seed,
        eval_examples=eval_examples,
        method_params=method_params,
        agent_limits=limits,
        regions=regions,
        privacy=local_privacy(secagg=secagg, dp_epsilon=dp_epsilon, dp_mode=dp_mode),
        data=data,
        metrics_port=metrics_port,
    )
    try:
        run_local(opts)
    except AggregatorError as exc:
        _fail(str(exc))


def _open_ledger(state_dir: Path) -> Any:
    from aggregator.store.ledger import Ledger

    path = state_dir / "ledger.sqlite"
    if not path.exists():
        raise AggregatorError(f"{state_dir}: no ledger here (is this the aggregator's state_dir?)")
    return Ledger(path)


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), required=True)
@click.option("--run", "run", default=None, help="A run id; default: the latest run.")
@click.option("--json", "as_json", is_flag=True)
def status(state_dir: Path, run: str | None, as_json: bool) -> None:
    """Service and run state, agents, rounds, metrics and bytes of a run in a state directory."""
    from aggregator.runs.cli import describe_state, run_state

    try:
        ledger = _open_ledger(state_dir)
        run_id = _pick_run(ledger, run)
        rounds = ledger.rounds(run_id) if run_id else []
        data = {
            "run_id": run_id,
            "run": ledger.run(run_id) if run_id else None,
            **run_state(ledger, state_dir, run_id),
            "agents": [
                {
                    "agent_id": a.agent_id,
                    "last_seen": a.last_seen,
                    "cpus": a.profile.get("cpus"),
                    "ram_total": a.profile.get("ram_total"),
                    "gpus": [g.get("name") for g in a.profile.get("gpus", [])],
                }
                for a in ledger.agents()
            ],
            "state": _method_state(_run_dir(ledger, state_dir, run_id)),
            "rounds": [
                {
                    "round": r.round,
                    "committed": r.committed_at is not None,
                    "assigned": r.assigned,
                    **r.metrics,
                }
                for r in rounds
            ],
            "evals": ledger.evals(run_id) if run_id else [],
        }
        ledger.close()
    except AggregatorError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    method = (data["run"] or {}).get("method", "?")
    click.echo(f"run {data['run_id']}  method {method}")
    for line in describe_state(data):
        click.echo(line)
    for key, value in data["state"].items():
        click.echo(f"  {key}: {value if len(value) <= 300 else value[:297] + '...'}")
    click.echo(f"{'agent':<20} {'cpus':>4} {'RAM GB':>7} gpus")
    for a in data["agents"]:
        click.echo(
            f"{a['agent_id']:<20} {a['cpus'] or 0:>4} {(a['ram_total'] or 0) / 1e9:>7.1f} "
            f"{', '.join(a['gpus']) or '-'}"
        )
    click.echo(
        f"{'round':>5} {'agents':>6} {'train loss':>10} {'eval loss':>9} {'Rouge-L':>7} "
        f"{'eval EM':>7} "
        f"{'up/agent B':>11} {'down/agent B':>12}"
    )
    for r in data["rounds"]:
        click.echo(
            f"{r['round']:>5} {len(r['assigned']):>6} {_cell(r, 'train_loss', '.4f'):>10} "
            f"{_cell(r, 'eval_loss', '.4f'):>9} {_cell(r, 'eval_rouge_l', '.4f'):>7} "
            f"{_cell(r, 'eval_em', '.3f'):>7} "
            f"{_cell(r, 'bytes_up_per_agent', '.0f'):>11} "
            f"{_cell(r, 'bytes_down_per_agent', '.0f'):>12}"
            + (
                f"  ε={r['dp_epsilon']:.3f} (δ={r.get('dp_delta', 0):g})"
                if "dp_epsilon" in r
                else ""
            )
        )
    _print_evals(data["evals"])


def _print_evals(evals: list[dict[str, Any]]) -> None:
    """Every evaluation of the global, per agent and in aggregate (round 0: the base)."""
    if not evals:
        return
    click.echo(
        f"{'eval':>5} {'agent':<16} {'examples':>8} {'eval loss':>9} {'Rouge-L':>7} {'EM':>6}"
    )
    for ev in evals:
        for who, m in [*sorted(ev["agents"].items()), ("all (weighted)", ev["aggregate"])]:
            click.echo(
                f"{ev['round']:>5} {who:<16} {_cell(m, 'examples', '.0f'):>8} "
                f"{_cell(m, 'eval_loss', '.4f'):>9} {_cell(m, 'eval_rouge_l', '.4f'):>7} "
                f"{_cell(m, 'eval_em', '.3f'):>6}"
            )


def _pick_run(ledger: Any, run: str | None) -> str | None:
    """``run`` if the ledger has it (else a one-line error), or the latest run."""
    if run is None:
        return ledger.latest_run()
    if ledger.run(run) is None:
        known = ", ".join(ledger.run_ids()) or "none"
        raise AggregatorError(f"no run {run!r} in this state dir (runs: {known})")
    return run


def _run_dir(ledger: Any, state_dir: Path, run_id: str | None) -> Path:
    """The folder of a run's checkpoints (the state dir itself for its first run)."""
    if run_id is None:
        return state_dir
    from aggregator.runs.state import DIR

    return state_dir / str(ledger.get_state(run_id, DIR, "."))


def _method_state(run_dir: Path) -> dict[str, str]:
    """The method's string metadata in the latest checkpoint (e.g. FedPipe's selection)."""
    from aggregator.store.checkpoint import CheckpointStore

    manifest = CheckpointStore(run_dir / "checkpoints").manifest()
    if manifest is None:
        return {}
    return {k: v for k, v in manifest.meta.items() if k != "run_id"} | {
        "checkpoint_round": str(manifest.round)
    }


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--run", "run", default=None, help="A run id; default: the latest run.")
@click.option("--round", "round_", type=int, default=None, help="Default: the latest committed.")
@click.option(
    "--merge-into",
    type=click.Path(path_type=Path),
    default=None,
    help="Base model directory: also write a merged model.",
)
def export(
    state_dir: Path, out: Path, run: str | None, round_: int | None, merge_into: Path | None
) -> None:
    """Export the global result as a PEFT adapter directory (and optionally merged)."""
    from aggregator.methods import MethodContext, server_methods
    from aggregator.store.checkpoint import CheckpointStore
    from aggregator.store.export import merge_into_base
    from aggregator.store.export_layout import KINDS, export_result

    try:
        ledger = _open_ledger(state_dir)
        run_id = _pick_run(ledger, run)
        record = ledger.run(run_id) if run_id else None
        run_dir = _run_dir(ledger, state_dir, run_id)
        ledger.close()
        if record is None:
            raise AggregatorError(f"{state_dir}: no run recorded")
        store = CheckpointStore(run_dir / "checkpoints")
        tensors, manifest, _ = store.load(round_)
        cfg = record["config"]
        model_dir = cfg["run"].get("model_dir")
        context = MethodContext(
            model_name=cfg["run"]["model"],
            model_dir=Path(model_dir) if model_dir else None,
            state_dir=run_dir,
            seed=cfg["run"].get("seed", 0),
            public_data=Path(cfg["run"]["public_data"]) if cfg["run"].get("public_data") else None,
        )
        method = server_methods()[record["method"]](cfg.get("method", {}), context)
        method.restore(tensors, manifest.meta)
        kind = KINDS.get(record["method"], "adapter")
        written = export_result(
            method,
            record["method"],
            out,
            model=cfg["run"]["model"],
            model_dir=Path(model_dir) if model_dir else None,
            round_=manifest.round,
        )
        click.echo(f"exported run {run_id} round {manifest.round} ({kind}): {written[kind]}")
        if merge_into is not None:
            lora = getattr(getattr(method, "params", None), "lora", None)
            if lora is None:
                raise AggregatorError("this method has no LoRA adapter to merge")
            click.echo(f"merged: {merge_into_base(merge_into, out / 'merged', tensors, lora)}")
    except AggregatorError as exc:
        _fail(str(exc))


main.add_command(keygen_command(TOOL, "aggregator", "every agent (security.server_public_key)"))


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command("check")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
def config_check(config_path: Path) -> None:
    """Validate a config file; report every error at once."""
    from aggregator.ops.config import load_config

    try:
        load_config(config_path)
    except AggregatorError as exc:
        _fail(str(exc))
    click.echo("ok")


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--run", "--run-id", "run_id", default=None, help="Default: the latest run.")
def report(state_dir: Path, out: Path, run_id: str | None) -> None:
    """Plots of loss, eval score and bytes per agent per round (PNG) and an HTML page."""
    from aggregator.ops.report import write_report

    try:
        files = write_report(state_dir, out, run_id)
    except AggregatorError as exc:
        _fail(str(exc))
    click.echo(f"report: {files.html}")
    for png in (files.loss, files.eval, files.bytes):
        click.echo(f"plot:   {png}")


def _register() -> None:
    from aggregator.runs.cli import runs

    main.add_command(runs)


_register()


def _add_data_commands() -> None:
    from aggregator.data.cli import data

    main.add_command(data)


_add_data_commands()

if __name__ == "__main__":
    main()
