"""``edgefed-aggregator local``: a whole federated run on one machine.

It prepares the embedded default model (by running ``edgefed-agent model prepare``), writes the
demo data split non-IID across agents, makes throw-away CURVE keys, starts the aggregator
service in this process and N agent daemons as separate processes (by command, on loopback),
prints a row per round (:mod:`aggregator.local.round_table`), and ends by exporting the result.
With ``--metrics-port`` the aggregator and every agent serve Prometheus metrics (each agent on
a free port of its own; the URLs are printed). Its
options and their parsers: :mod:`aggregator.local.options`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from aggregator.engine.service import AggregatorService
from aggregator.errors import AggregatorError
from aggregator.local.data import DEMO, method_overrides, prepare_local_data
from aggregator.local.options import LocalOptions
from aggregator.local.progress import Ticker
from aggregator.local.regions import AgentLink, deal, start_regions
from aggregator.local.round_table import RoundTable
from aggregator.local.workdir import make_keys, write_agent_config
from aggregator.ops.config import AggregatorConfig, build_config
from aggregator.store.export import merge_into_base
from protocol.messages import BaseModelRef
from protocol.parent import child_env

log = logging.getLogger(__name__)


def agent_command() -> list[str]:
    """The agent daemon as a command (the installed script, or the module beside us)."""
    script = Path(sys.executable).with_name("edgefed-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent"]


def prepare_model(
    model: str, cache: Path | None = None, *, progress: bool | None = None
) -> dict[str, str]:
    """``edgefed-agent model prepare``: its JSON answer. With ``progress`` (default: when our
    stderr is a terminal) its progress bars (the one-time GGUF conversion) show on our stderr;
    otherwise its stderr is kept for the error message."""
    if progress is None:
        progress = sys.stderr.isatty()
    cmd = [*agent_command(), "model", "prepare", "--model", model]
    cmd += ["--progress"] if progress else ["--no-progress"]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines() or ["its messages are above"]
        raise AggregatorError(f"preparing model {model!r} failed: {tail[-1]}")
    info: dict[str, str] = json.loads(proc.stdout)
    return info


def run_local(opts: LocalOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    workdir = opts.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "logs").mkdir()
    tiers = f" behind {opts.regions} regions" if opts.regions else ""
    print(
        f"edgefed local: {opts.method}, {opts.agents} agents{tiers}, {opts.rounds} rounds in "
        f"{workdir}",
        file=out,
        flush=True,
    )
    started = time.monotonic()
    print(
        f"preparing base model {opts.model} (converted once, then cached)...", file=out, flush=True
    )
    info = prepare_model(opts.model)
    print(
        f"base model {info['name']} sha256 {info['sha256'][:16]}… at {info['path']} "
        f"({time.monotonic() - started:.0f} s)",
        file=out,
        flush=True,
    )
    agent_ids = [f"agent-{i + 1}" for i in range(opts.agents)]
    data = prepare_local_data(
        opts.data,
        workdir / "data",
        agents=opts.agents,
        per_agent=opts.per_agent,
        n_eval=opts.eval_examples,
        alpha=opts.alpha,
        seed=opts.seed,
    )
    if data.name != DEMO:
        print(f"data: {data.name} ({data.eval_size} held-out examples)", file=out, flush=True)
    train_of = dict(zip(agent_ids, data.train, strict=True))
    if data.name == DEMO:  # written afresh for this run: name each file for its agent
        train_of = _named_for_agents({f"agent-{i}": p for i, p in enumerate(data.train)}, agent_ids)
    members = deal(agent_ids, opts.regions) if opts.regions else {}
    participants = list(members) or agent_ids  # who joins this aggregator
    keys = None if opts.insecure else make_keys(workdir, participants)

    method_params: dict[str, Any] = {
        "lora": {"r": opts.rank, "alpha": 2.0 * opts.rank},
        "train": {"steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr},
        "eval": {"max_examples": -(-data.eval_size // opts.agents)},
    }
    for key, value in method_overrides(data).items():  # the split's token budget
        method_params[key] = {**method_params[key], **value}
    from protocol.methods import PARAMS

    # the common blocks this method's parameters have (a method may have no LoRA, say)
    fields = PARAMS[opts.method].model_fields if opts.method in PARAMS else {}
    method_params = {k: v for k, v in method_params.items() if k in fields}
    for key, value in (opts.method_params or {}).items():
        if isinstance(value, dict) and isinstance(method_params.get(key), dict):
            method_params[key] = {**method_params[key], **value}
        else:
            method_params[key] = value
    limits = opts.agent_limits or {}
    unknown = sorted(set(limits) - set(agent_ids))
    if unknown:
        raise AggregatorError(f"--agent-limit names no such agent: {', '.join(unknown)}")
    raw: dict[str, Any] = {
        "server": {
            "bind": "tcp://127.0.0.1:0",
            "state_dir": str(workdir / "state"),
            "heartbeat_interval": 1.0,
            "liveness": 15,  # a method may hold the loop for seconds (SLoRA's SVD switch)
            "max_message_bytes": 2 << 30,  # as the agents' limit: fedavg sends whole models
            "metrics_port": opts.metrics_port,
        },
        "security": {"regions": list(members)}
        | (
            {"insecure": True}
            if keys is None
            else {"secret_key": str(keys["server_secret"]), "allow_dir": str(keys["allow"])}
        ),
        "run": {
            "method": opts.method,
            "rounds": opts.rounds,
            "min_agents": len(participants),
            "model": opts.model,
            "model_sha256": info["sha256"],
            "model_dir": info["path"],
            "public_data": str(data.public),
            "quant": opts.quant,
            "seed": opts.seed,
            "round_deadline_s": 1800.0,
        },
        "method": method_params,
        "privacy": opts.privacy or {},
    }
    config: AggregatorConfig = build_config(raw, source="local")
    table = RoundTable(out)
    service = AggregatorService(
        config, BaseModelRef(name=opts.model, sha256=info["sha256"]), on_round=table
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            service.run()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            service.bound.set()

    thread = threading.Thread(target=serve, name="aggregator", daemon=True)
    thread.start()
    service.bound.wait()
    if errors:
        raise errors[0]
    threads = max(1, (os.cpu_count() or 1) // opts.agents)
    agent_ports = free_ports(len(agent_ids)) if opts.metrics_port is not None else []
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    try:
        if members:
            region_run = {k: raw["run"][k] for k in ("method", "model", "model_sha256",
                                                     "model_dir", "quant", "seed")}  # fmt: skip
            links, procs, logs = start_regions(workdir, members, service.endpoint, keys, region_run)
        else:
            links = {
                a: AgentLink(
                    service.endpoint,
                    keys["dir"] / f"{a}.key_secret" if keys else None,
                    keys["server_public"] if keys else None,
                )
                for a in agent_ids
            }
        for i, agent_id in enumerate(agent_ids):
            cfg_path = workdir / f"{agent_id}.toml"
            link = links[agent_id]
            security: dict[str, object] = (
                {"insecure": True}
                if link.secret_key is None
                else {
                    "secret_key": str(link.secret_key),
                    "server_public_key": str(link.server_public_key),
                }
            )
            write_agent_config(
                cfg_path,
                {
                    "agent": {
                        "id": agent_id,
                        "aggregator": link.endpoint,
                        "state_dir": str(workdir / agent_id),
                        "model": opts.model,
                        "data": str(train_of[agent_id]),
                        "eval_data": str(data.eval_shards[i]),
                        "threads": threads,
                        "heartbeat_interval": 1.0,
                        "liveness": 15,
                        "memory_limit": _int_or_none(limits.get(agent_id, {}).get("memory")),
                        "bandwidth_limit_mbps": limits.get(agent_id, {}).get("bandwidth"),
                        "metrics_port": agent_ports[i] if agent_ports else None,
                    },
                    "security": security,
                },
            )
            log_file = open(workdir / "logs" / f"{agent_id}.log", "wb")  # noqa: SIM115
            logs.append(log_file)
            procs.append(
                subprocess.Popen(
                    [*agent_command(), "run", "--config", str(cfg_path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                )
            )
        print(
            f"started {len(procs) or len(agent_ids)} agent processes; logs in {workdir / 'logs'}",
            file=out,
            flush=True,
        )
        if service.metrics.port is not None:
            url = f"http://127.0.0.1:{service.metrics.port}/metrics"
            print(f"metrics: {url}", file=out, flush=True)
        for agent_id, port in zip(agent_ids, agent_ports, strict=False):
            # each agent serves its own once it has loaded its data and model
            print(
                f"agent metrics: {agent_id} http://127.0.0.1:{port}/metrics", file=out, flush=True
            )
        ticker = Ticker(service, out)
        while thread.is_alive():
            thread.join(0.5)
            ticker.poll()
            blocked = (ticker.latest or {}).get("blocked")
            if blocked:  # every agent of this run is live: none will come to fill the gap
                service.should_exit.set()
                thread.join()
                raise AggregatorError(
                    f"the run cannot go on: {blocked} (every agent of this local run is live: "
                    f"none will come to take its place); logs in {workdir / 'logs'}"
                )
            dead = [p for p in procs if p.poll() is not None]
            if len(dead) == len(procs):
                service.should_exit.set()
                thread.join()
                raise AggregatorError(
                    f"every agent exited before the run finished; see {workdir / 'logs'}"
                )
        if errors:
            raise errors[0]
    finally:
        service.should_exit.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    exported = service.export(workdir / "export")
    result: dict[str, Any] = {
        "adapter": str(exported["adapter"]),
        "rounds": trained_rounds(table.rows),
    }
    if "model" in exported:  # full-parameter methods (ferret) export a whole model
        result["model"] = str(exported["model"])
        print(f"exported fine-tuned model: {exported['model']}", file=out)
    else:
        print(f"exported PEFT adapter: {exported['adapter']}", file=out)
    if opts.merge:
        merged = merge_into_base(
            Path(info["path"]),
            workdir / "export" / "merged",
            service.method.state()[0],
            _lora_of(service),
        )
        result["merged"] = str(merged)
        print(f"exported merged model: {merged}", file=out)
    result["rows"] = [r.as_metrics() | r.method | {"round": r.round} for r in table.rows]
    result["seconds"] = time.monotonic() - started
    print(f"done in {result['seconds']:.0f} s", file=out, flush=True)
    (workdir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def _lora_of(service: AggregatorService) -> Any:
    params = getattr(service.method, "params", None)
    lora = getattr(params, "lora", None)
    if lora is None:
        raise AggregatorError(f"method {service.config.run.method} has no LoRA adapter to merge")
    return lora


def _named_for_agents(files: dict[str, Path], agent_ids: list[str]) -> dict[str, Path]:
    """Rename the demo split's 0-based ``agent-<i>.jsonl`` for the agent that trains on it
    (``agent_ids[i]``, 1-based), so that agent-1's config and log name ``agent-1.jsonl``.
    Renamed from the last, so that no file is overwritten before it has moved."""
    out: dict[str, Path] = {}
    for i in reversed(range(len(agent_ids))):
        source = files[f"agent-{i}"]
        target = source.with_name(f"{agent_ids[i]}.jsonl")
        if source != target:
            source.rename(target)
        out[agent_ids[i]] = target
    return out


def trained_rounds(rows: list[Any]) -> int:
    """Rounds that trained: the table's row 0 is the initial evaluation, not a round."""
    return sum(1 for row in rows if row.round > 0)
