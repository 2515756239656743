"""``edgefed-aggregator local``: a whole federated run on one machine.

It prepares the embedded default model (by running ``edgefed-agent model prepare``), writes the
demo data split non-IID across agents, makes throw-away CURVE keys, starts the aggregator
service in this process and N agent daemons as separate processes (by command, on loopback),
prints a row per round, and ends by exporting the result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import zmq.auth

from aggregator.config import AggregatorConfig, build_config
from aggregator.demo_data import make_demo_split, write_demo
from aggregator.engine import RoundSummary
from aggregator.errors import AggregatorError
from aggregator.export import merge_into_base
from aggregator.service import AggregatorService
from protocol.messages import BaseModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOptions:
    method: str
    agents: int
    rounds: int
    workdir: Path
    model: str
    alpha: float
    per_agent: int
    steps: int
    batch_size: int
    lr: float
    rank: int
    quant: str
    insecure: bool
    merge: bool
    seed: int
    eval_examples: int
    method_params: dict[str, Any] | None = None
    agent_limits: dict[str, dict[str, float]] | None = None
    """Per agent id, simulated limits: ``memory`` (bytes) and ``bandwidth`` (Mbit/s)."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """``"600MB"`` → 600000000; ``"1.5GiB"``; a bare number is bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 600MB, 1.5GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_agent_limits(specs: Sequence[str]) -> dict[str, dict[str, float]]:
    """``["agent-2:memory=600MB,bandwidth=20"]`` → ``{"agent-2": {"memory": 6e8, ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        agent, sep, rest = spec.partition(":")
        if not sep or not agent:
            raise ValueError(f"{spec!r}: expected AGENT:memory=SIZE,bandwidth=MBPS")
        limits = out.setdefault(agent, {})
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in ("memory", "bandwidth"):
                raise ValueError(f"{spec!r}: {item!r} is not memory=SIZE or bandwidth=MBPS")
            try:
                limits[key] = float(parse_size(value)) if key == "memory" else float(value)
            except ValueError:
                raise ValueError(f"{spec!r}: bad value {value!r} for {key}") from None
            if limits[key] <= 0:
                raise ValueError(f"{spec!r}: {key} must be positive")
    return out


def parse_params(specs: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=4", "emulator.drop=0.5"]`` → nested dict (values as JSON when they parse)."""
    out: dict[str, Any] = {}
    for spec in specs:
        key, eq, raw = spec.partition("=")
        if not eq or not key:
            raise ValueError(f"{spec!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{spec!r}: {part} is already a value")
        node[parts[-1]] = value
    return out


def agent_command() -> list[str]:
    """The agent daemon as a command (the installed script, or the module beside us)."""
    script = Path(sys.executable).with_name("edgefed-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent"]


def prepare_model(model: str, cache: Path | None = None) -> dict[str, str]:
    cmd = [*agent_command(), "model", "prepare", "--model", model]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AggregatorError(f"preparing model {model!r} failed: {tail}")
    info: dict[str, str] = json.loads(proc.stdout)
    return info


def make_keys(workdir: Path, agent_ids: list[str]) -> dict[str, Path]:
    keys = workdir / "keys"
    allow = keys / "allow"
    for d in (keys, allow):
        d.mkdir(parents=True, exist_ok=True)
    pub, secret = zmq.auth.create_certificates(str(keys), "aggregator")
    os.chmod(secret, 0o600)
    for agent_id in agent_ids:
        a_pub, a_secret = zmq.auth.create_certificates(str(keys), agent_id)
        os.chmod(a_secret, 0o600)
        shutil.copy(a_pub, allow / Path(a_pub).name)
    return {"server_public": Path(pub), "server_secret": Path(secret), "allow": allow, "dir": keys}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_agent_config(path: Path, values: dict[str, dict[str, object]]) -> None:
    lines: list[str] = []
    for section, items in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in items.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


class RoundTable:
    """Prints one row per round as rounds finish."""

    HEADER = (
        f"{'round':>5} {'agents':>6} {'train loss':>10} {'eval loss':>9} {'eval EM':>7} "
        f"{'up/agent':>10} {'down/agent':>10} {'time s':>7}"
    )

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.rows: list[RoundSummary] = []
        print(self.HEADER, file=out, flush=True)

    @staticmethod
    def _fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def __call__(self, s: RoundSummary) -> None:
        self.rows.append(s)
        up = _human(s.bytes_up) if s.round > 0 else "-"
        down = _human(s.bytes_down) if s.round > 0 else "-"
        print(
            f"{s.round:>5} {s.agents if s.round else '-':>6} {self._fmt(s.train_loss, '.4f'):>10} "
            f"{self._fmt(s.eval_loss, '.4f'):>9} {self._fmt(s.eval_em, '.3f'):>7} "
            f"{up:>10} {down:>10} {s.seconds if s.round else 0:>7.1f}"
            + "".join(f"  {k}={v:g}" for k, v in s.method.items() if k != "examples"),
            file=self.out,
            flush=True,
        )
        if any(set(row) - {"up", "down"} for row in s.per_agent.values()):
            for agent_id, row in s.per_agent.items():
                extra = "".join(f"  {k}={v}" for k, v in row.items() if k not in ("up", "down"))
                print(
                    f"{'':>5} {agent_id:>12}  up {_human(float(row.get('up', 0))):>9}  "
                    f"down {_human(float(row.get('down', 0))):>9}{extra}",
                    file=self.out,
                    flush=True,
                )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run_local(opts: LocalOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    workdir = opts.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "logs").mkdir()
    print(
        f"edgefed local: {opts.method}, {opts.agents} agents, {opts.rounds} rounds in {workdir}",
        file=out,
        flush=True,
    )
    started = time.monotonic()
    info = prepare_model(opts.model)
    print(
        f"base model {info['name']} sha256 {info['sha256'][:16]}… at {info['path']}",
        file=out,
        flush=True,
    )
    agent_ids = [f"agent-{i + 1}" for i in range(opts.agents)]
    split = make_demo_split(
        opts.agents,
        per_agent=opts.per_agent,
        alpha=opts.alpha,
        seed=opts.seed,
        n_eval=opts.eval_examples,
    )
    files = write_demo(workdir / "data", split)
    # each agent evaluates a disjoint shard of the held-out set; the weighted mean is the whole
    shards = [split.eval[i :: opts.agents] for i in range(opts.agents)]
    for i, shard in enumerate(shards):
        (workdir / "data" / f"eval-{i + 1}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in shard), encoding="utf-8"
        )
    keys = None if opts.insecure else make_keys(workdir, agent_ids)

    method_params: dict[str, Any] = {
        "lora": {"r": opts.rank, "alpha": 2.0 * opts.rank},
        "train": {"steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr},
        "eval": {"max_examples": max(len(s) for s in shards)},
    }
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
        },
        "security": {"insecure": True}
        if keys is None
        else {"secret_key": str(keys["server_secret"]), "allow_dir": str(keys["allow"])},
        "run": {
            "method": opts.method,
            "rounds": opts.rounds,
            "min_agents": opts.agents,
            "model": opts.model,
            "model_sha256": info["sha256"],
            "model_dir": info["path"],
            "public_data": str(files["public"]),
            "quant": opts.quant,
            "seed": opts.seed,
            "round_deadline_s": 1800.0,
        },
        "method": method_params,
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
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i, agent_id in enumerate(agent_ids):
            cfg_path = workdir / f"{agent_id}.toml"
            security: dict[str, object] = (
                {"insecure": True}
                if keys is None
                else {
                    "secret_key": str(keys["dir"] / f"{agent_id}.key_secret"),
                    "server_public_key": str(keys["server_public"]),
                }
            )
            write_agent_config(
                cfg_path,
                {
                    "agent": {
                        "id": agent_id,
                        "aggregator": service.endpoint,
                        "state_dir": str(workdir / agent_id),
                        "model": opts.model,
                        "data": str(files[f"agent-{i}"]),
                        "eval_data": str(workdir / "data" / f"eval-{i + 1}.jsonl"),
                        "threads": threads,
                        "heartbeat_interval": 1.0,
                        "liveness": 15,
                        "memory_limit": _int_or_none(limits.get(agent_id, {}).get("memory")),
                        "bandwidth_limit_mbps": limits.get(agent_id, {}).get("bandwidth"),
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
                )
            )
        while thread.is_alive():
            thread.join(0.5)
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
    exported = service.export(workdir / "export" / "adapter")
    result: dict[str, Any] = {"adapter": str(exported["adapter"]), "rounds": len(table.rows)}
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


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def _lora_of(service: AggregatorService) -> Any:
    params = getattr(service.method, "params", None)
    lora = getattr(params, "lora", None)
    if lora is None:
        raise AggregatorError(f"method {service.config.run.method} has no LoRA adapter to merge")
    return lora
