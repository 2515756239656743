"""``edgefed-agent``: run the daemon, print the machine profile, prepare the model, make keys.

Every option can also come from the environment: ``EDGEFED_AGENT_CONFIG``,
``EDGEFED_AGENT_AGGREGATOR``, ``EDGEFED_AGENT_INSECURE`` for ``run``, and click's
``EDGEFED_AGENT_<COMMAND>_<OPTION>`` for the rest (e.g. ``EDGEFED_AGENT_MODEL_PREPARE_CACHE``),
which suits systemd units. A user error (bad config, missing or malformed data, a model that
cannot be found, a click usage error) prints ``edgefed-agent: ...`` lines on stderr and exits
with code 2 (:mod:`protocol.cli_common`). ``run`` works under umask 0077: the state, outbox and
logs it creates are its owner's only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edge_agent.errors import EdgeAgentError
from protocol.cli_common import (
    ToolGroup,
    fail,
    keygen_command,
    private_umask,
)
from protocol.logformat import FORMATS, LogFormat, configure

if TYPE_CHECKING:
    from edge_agent.daemon.daemon import Daemon

TOOL = "edgefed-agent"
_CONFIG_PATH = click.Path(path_type=Path, dir_okay=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the agent's own errors into ``edgefed-agent: ...`` lines and exit code 2."""
    try:
        yield
    except EdgeAgentError as exc:
        fail(TOOL, str(exc) or type(exc).__name__)


def log_destination() -> Path | None:
    """The regular file this process's stderr (where its log goes) writes to, if it is one:
    ``local`` sends each agent's output to ``logs/<agent>.log``; under systemd it is the
    journal (no file)."""
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            return None
        return Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return None


def _say_start(config: Any) -> None:
    """One line up front with what this agent is and uses, so a log names its own files."""
    a = config.agent
    where = log_destination()
    logging.getLogger("edge_agent").info(
        "agent %s starting: data %s, state %s, model %s%s",
        a.id,
        a.data,
        a.state_dir,
        a.model,
        f", log {where}" if where is not None else "",
    )


@contextmanager
def _signal_handlers(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop the daemon gracefully; a second one stops it without waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handle(signum: int, frame: Any) -> None:
        again = daemon.stopping
        daemon.log.info(
            "%s received; %s", signal.Signals(signum).name, "forcing" if again else "stopping"
        )
        daemon.request_stop(force=again)

    for sig in signals:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _setup_logging(verbose: int, log_format: LogFormat = "text") -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    configure(level, log_format, "%(asctime)s %(levelname)-7s %(name)s: %(message)s")


@click.group(
    cls=ToolGroup,
    tool=TOOL,
    user_errors=(EdgeAgentError,),
    context_settings={"auto_envvar_prefix": "EDGEFED_AGENT", "help_option_names": ["-h", "--help"]},
)
def main() -> None:
    """edgefed agent: fine-tunes locally on this edge server's private data."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=_CONFIG_PATH,
    required=True,
    envvar="EDGEFED_AGENT_CONFIG",
    help="agent.toml",
)
@click.option(
    "--aggregator", envvar="EDGEFED_AGENT_AGGREGATOR", help="Endpoint, e.g. tcp://10.0.0.5:5555."
)
@click.option(
    "--insecure",
    is_flag=True,
    default=False,
    envvar="EDGEFED_AGENT_INSECURE",
    help="No CURVE encryption or authentication (trusted test networks only).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Override agent.metrics_port: serve Prometheus metrics there (0: any free port).",
)
@click.option("-v", "--verbose", count=True, help="Debug logging.")
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Log lines as text, or as JSON objects (one per line).",
)
def run(
    config_path: Path,
    aggregator: str | None,
    insecure: bool,
    metrics_port: int | None,
    verbose: int,
    log_format: LogFormat,
) -> None:
    """Run the agent daemon until SIGTERM/SIGINT (under umask 0077: what it writes is private)."""
    from protocol.parent import die_with_parent

    die_with_parent()  # started by `edgefed-aggregator local`: stop when it dies
    _setup_logging(verbose, log_format)
    from edge_agent.model import quiet

    quiet.install()
    overrides: dict[str, dict[str, Any]] = {
        "agent": {"aggregator": aggregator, "metrics_port": metrics_port},
        "security": {"insecure": True if insecure else None},
    }
    with private_umask():
        code = _run(config_path, overrides)
    sys.exit(code)


def _run(config_path: Path, overrides: dict[str, dict[str, Any]]) -> int:
    from edge_agent.daemon.config import load_config
    from edge_agent.daemon.daemon import Daemon

    try:
        with _user_errors():
            config = load_config(config_path, overrides)
            _say_start(config)
            daemon = Daemon.from_config(config)  # reads data, resolves the model: may take a while
    except KeyboardInterrupt:
        click.echo("interrupted before the agent started", err=True)
        return 130
    with _signal_handlers(daemon):
        return daemon.run()


@main.command()
@click.option("--measure/--no-measure", default=True, help="Time matmuls (a few seconds).")
@click.option(
    "--disk",
    "disk_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to measure free disk.",
)
def profile(measure: bool, disk_path: Path | None) -> None:
    """Print this machine's profile (what Hello reports) as JSON."""
    from edge_agent.daemon.profile import collect_profile

    with _user_errors():
        data = collect_profile(measure=measure, disk_path=disk_path)
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@main.group()
def model() -> None:
    """The base model."""


@model.command("prepare")
@click.option(
    "--model",
    "spec",
    default="smollm2-135m",
    show_default=True,
    help="Alias, HF directory or .gguf.",
)
@click.option(
    "--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False), default=None
)
@click.option(
    "--quant",
    "quants",
    multiple=True,
    type=click.Choice(["nf4", "int8", "bf16"]),
    help="Also save the checkpoint of this precision now, not at the first task (repeatable).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr while converting (default: when stderr is a terminal).",
)
def model_prepare(
    spec: str, cache_dir: Path | None, quants: tuple[str, ...], progress: bool | None
) -> None:
    """Resolve the model (converting a .gguf once) and print {"name", "path", "sha256"}."""
    from edge_agent.model.store import resolve_model

    if progress is None:
        progress = sys.stderr.isatty()
    with _user_errors():
        resolved = resolve_model(spec, cache_dir=cache_dir, progress=progress)
        if quants:
            from edge_agent.model.store import load_base

            for quant in quants:
                load_base(resolved, quant, cache_dir=cache_dir)  # type: ignore[arg-type]
    out = {"name": resolved.name, "path": str(resolved.path), "sha256": resolved.sha256}
    click.echo(json.dumps(out))


main.add_command(keygen_command(TOOL, "agent", "the aggregator's allow-list (allow_dir)"))


@main.group("config")
def config_group() -> None:
    """The configuration file."""


@config_group.command("check")
@click.option(
    "--config", "config_path", type=_CONFIG_PATH, required=True, envvar="EDGEFED_AGENT_CONFIG"
)
def config_check(config_path: Path) -> None:
    """Validate agent.toml and list every problem at once."""
    from edge_agent.daemon.config import load_config

    with _user_errors():
        load_config(config_path)
    click.echo("ok")


if __name__ == "__main__":  # pragma: no cover
    main()
