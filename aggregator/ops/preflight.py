"""What ``serve``/``region``/``local`` need on disk, checked with the config's fields.

:func:`file_problems` validates each section alone, so a field error elsewhere does not hide a
missing key file, and reports every file that is missing or unusable: the CURVE secret key (a
missing file is called missing, not "Invalid certificate file"), the allow-list directory, the
public data, the model directory and the upstream keys (read by
:func:`protocol.cli_common.key_file_problems`, as the agent's check reads its keys). Nothing is
created here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from protocol.cli_common import key_file_problems


def _section(raw: Mapping[str, Any], name: str, model: type[BaseModel]) -> Any:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        return None
    try:
        return model.model_validate(dict(value))
    except ValidationError:
        return None  # its field errors are reported by build_config


def _fix(base: Path | None) -> Callable[[Path | None], Path | None]:
    def fix(path: Path | None) -> Path | None:
        if path is None or base is None or path.is_absolute():
            return path
        return base / path

    return fix


def _key(name: str, path: Path | None, *, secret: bool) -> list[str]:
    return [] if path is None else key_file_problems(name, path, secret=secret)


def file_problems(
    raw: Mapping[str, Any], base: Path | None, schemas: Mapping[str, type[BaseModel]]
) -> list[str]:
    """Every missing or unusable file the config names; paths resolve against ``base``.
    ``schemas``: the ``security``, ``run`` and ``upstream`` section models of
    :mod:`aggregator.ops.config` (passed in: that module imports this one)."""
    fix = _fix(base)
    problems: list[str] = []
    security = _section(raw, "security", schemas["security"])
    if security is not None and not security.insecure:
        problems += _key("security.secret_key", fix(security.secret_key), secret=True)
        allow = fix(security.allow_dir)
        if allow is not None and not allow.is_dir():
            problems.append(f"security.allow_dir: missing directory: {allow}")
    run = _section(raw, "run", schemas["run"])
    if run is not None:
        public = fix(run.public_data)
        if public is not None and not public.is_file():
            problems.append(f"run.public_data: missing file: {public}")
        model_dir = fix(run.model_dir)
        if model_dir is not None and not model_dir.is_dir():
            problems.append(f"run.model_dir: missing directory: {model_dir}")
    upstream = raw.get("upstream")
    up = _section(raw, "upstream", schemas["upstream"]) if isinstance(upstream, Mapping) else None
    if up is not None and not up.insecure:
        problems += _key("upstream.secret_key", fix(up.secret_key), secret=True)
        problems += _key("upstream.server_public_key", fix(up.server_public_key), secret=False)
    return problems


def method_problems(raw: Mapping[str, Any]) -> list[str]:
    """The method's parameters (``lr``, ``r``...), checked even when other fields are wrong."""
    from protocol.errors import ProtocolError
    from protocol.methods import parse_params

    run = raw.get("run", {})
    method = run.get("method", "fedit") if isinstance(run, Mapping) else "fedit"
    params = raw.get("method", {})
    if not isinstance(method, str) or not isinstance(params, Mapping):
        return []  # the field errors say why
    try:
        parse_params(method, params)
    except ProtocolError as exc:
        return [f"method: {exc}"]
    return []
