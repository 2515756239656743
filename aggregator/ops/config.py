"""Aggregator configuration: a TOML file validated by pydantic, every error reported at once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aggregator.errors import ConfigError
from aggregator.privacy.config import PrivacySection, privacy_problems

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ServerSection(_Section):
    bind: str = "tcp://127.0.0.1:5555"
    state_dir: Path = Path("edgefed-state")
    heartbeat_interval: Annotated[float, Field(gt=0, le=600)] = 1.0
    liveness: Annotated[int, Field(ge=1, le=100)] = 3
    max_message_bytes: Annotated[int, Field(ge=1 << 16)] = 256 << 20
    """Largest message accepted; a peer that sends more is disconnected by ZeroMQ unread.
    Size it to the largest payload of the run (a LoRA update of a 7B model at r=16 is ~80 MB)."""
    hwm: Annotated[int, Field(ge=1, le=100_000)] = 8
    """Messages queued per peer each way; with max_message_bytes it bounds what one peer can
    make the aggregator hold (8 × 256 MiB by default, far less for real payloads)."""
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = 3
    upload_window: Annotated[int, Field(ge=0, le=100_000)] = 8
    """Large results granted to travel at once (0: no flow control, every agent sends at once);
    with grant_above_bytes it bounds what the aggregator buffers, whatever the agent count."""
    grant_above_bytes: Annotated[int, Field(ge=0)] = 1 << 20
    """Results larger than this wait for a grant; smaller ones (metrics, Ferret) go at once."""
    grant_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """A granted upload that has not arrived after this long frees its slot."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Serve Prometheus metrics on this port (``aggregator.ops.metrics``); unset: no endpoint."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on (``0.0.0.0`` for a scraper on another host)."""
    keep_updates: bool = False
    """Keep every accepted update's payload on disk after its round commits (an audit trail);
    by default a round's stored updates are deleted once it commits (only the open round's are
    needed, to replay it after a crash)."""


class SecuritySection(_Section):
    insecure: bool = False
    secret_key: Path | None = None
    """The aggregator's CURVE secret key file (``edgefed-aggregator keygen``)."""
    allow_dir: Path | None = None
    """Directory of allowed agents' public key files; the file stem is the agent id."""
    regions: list[Annotated[str, Field(min_length=1, max_length=128)]] = []
    """Ids that may join as a regional tier (``Hello.role = "region"``, whose update stands for
    many agents); a region Hello from any other id is refused."""


class RunSection(_Section):
    run_id: Annotated[str, Field(max_length=40, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    method: str = "fedit"
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 3
    min_agents: Annotated[int, Field(ge=1, le=100_000)] = 1
    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    quorum: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Fraction of a round's assigned agents whose results let the round close without the rest:
    at its deadline, or as soon as every missing agent has gone silent (expired)."""
    round_deadline_s: Annotated[float, Field(gt=0)] = 1800.0
    eval: bool = True
    eval_initial: bool = True
    """Evaluate the starting point (round 0) before the first round."""
    model: str = "smollm2-135m"
    model_sha256: Sha256 | None = None
    model_dir: Path | None = None
    """A local copy of the base model (HF directory), for merged export."""
    public_data: Path | None = None
    """A JSONL the aggregator may train on (FedBiOT's emulator alignment); never private data."""
    quant: Literal["nf4", "int8", "bf16", "fp32"] = "nf4"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    export_dir: Path | None = None


class UpstreamSection(_Section):
    """Only for ``edgefed-aggregator region``: the upstream aggregator this tier reports to."""

    endpoint: Annotated[str, Field(pattern=r"^(tcp|ipc)://\S+$", max_length=512)]
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$")]
    """This region's agent id upstream (its public key file stem in the upstream allow-list)."""
    insecure: bool = False
    secret_key: Path | None = None
    """This region's CURVE secret key toward the upstream (``edgefed-agent keygen``)."""
    server_public_key: Path | None = None
    heartbeat_interval: Annotated[float, Field(gt=0, le=600)] = 1.0
    liveness: Annotated[int, Field(ge=1, le=100)] = 3


class AggregatorConfig(_Section):
    server: ServerSection = ServerSection()
    security: SecuritySection = SecuritySection()
    run: RunSection = RunSection()
    method: dict[str, Any] = {}
    upstream: UpstreamSection | None = None
    """Parameters of the run's method (``protocol.methods.<method>.Params``)."""
    privacy: PrivacySection = PrivacySection()


def _problems(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]


def build_config(
    raw: dict[str, Any],
    *,
    source: str = "config",
    base: Path | None = None,
    check_files: bool = False,
) -> AggregatorConfig:
    """Validate a config mapping; relative paths resolve against ``base``. With ``check_files``
    every file the config names must exist and the secret key must load (one pass for all)."""
    from aggregator.ops.preflight import file_problems, method_problems

    problems: list[str] = []
    config: AggregatorConfig | None = None
    try:
        config = AggregatorConfig.model_validate(raw)
    except ValidationError as exc:
        problems += _problems(exc)
    problems += method_problems(raw)
    if check_files:
        problems += file_problems(
            raw, base, {"security": SecuritySection, "run": RunSection, "upstream": UpstreamSection}
        )
    if config is not None:
        if not config.security.insecure and (
            config.security.secret_key is None or config.security.allow_dir is None
        ):
            problems.append(
                "security: CURVE is on by default and needs secret_key and allow_dir "
                "(or set insecure = true, knowingly)"
            )
        problems += privacy_problems(
            config.privacy,
            config.run.method,
            config.method,
            tiered=config.upstream is not None or bool(config.security.regions),
        )
        up = config.upstream
        if (
            up is not None
            and not up.insecure
            and (up.secret_key is None or up.server_public_key is None)
        ):
            problems.append(
                "upstream: CURVE toward the upstream needs secret_key and server_public_key "
                "(or set insecure = true, knowingly)"
            )
    if problems:
        raise ConfigError(f"{source}: " + f"\n{source}: ".join(problems))
    assert config is not None
    if base is not None:
        config = _resolve_paths(config, base)
    return _secagg_without_default_clip(config)


def _secagg_without_default_clip(config: AggregatorConfig) -> AggregatorConfig:
    """Under secure aggregation the aggregator sees only the sum, so the default per-update
    ``clip_norm`` (which would clip the sum as if it were one update) is off; an explicit one is
    refused by :func:`privacy_problems`, and ``[privacy] dp_clip`` clips on each agent."""
    aggregation = config.method.get("aggregation", {})
    if not config.privacy.secure_aggregation or not isinstance(aggregation, dict):
        return config
    method = {**config.method, "aggregation": {**aggregation, "clip_norm": 0}}
    return config.model_copy(update={"method": method})


def _resolve_paths(config: AggregatorConfig, base: Path) -> AggregatorConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p))

    server = config.server.model_copy(update={"state_dir": fix(config.server.state_dir)})
    security = config.security.model_copy(
        update={
            "secret_key": fix(config.security.secret_key),
            "allow_dir": fix(config.security.allow_dir),
        }
    )
    run = config.run.model_copy(
        update={
            "model_dir": fix(config.run.model_dir),
            "export_dir": fix(config.run.export_dir),
            "public_data": fix(config.run.public_data),
        }
    )
    upstream = config.upstream
    if upstream is not None:
        upstream = upstream.model_copy(
            update={
                "secret_key": fix(upstream.secret_key),
                "server_public_key": fix(upstream.server_public_key),
            }
        )
    return config.model_copy(
        update={"server": server, "security": security, "run": run, "upstream": upstream}
    )


def load_config(
    path: Path, overrides: dict[str, dict[str, Any]] | None = None, *, check_files: bool = True
) -> AggregatorConfig:
    """Read ``path`` (TOML), apply ``overrides`` per section, validate everything at once
    (with ``check_files``, the files it names too: see :mod:`aggregator.ops.preflight`)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return build_config(raw, source=str(path), base=path.parent.resolve(), check_files=check_files)
