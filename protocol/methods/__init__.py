"""Per-method wire specs: each method's task parameters, validated the same way on both sides.

Every method ``X`` named in :data:`NAMES` is a folder on each side, with files named for their
roles: ``protocol/methods/X/spec.py`` (its ``Params`` pydantic model and payload conventions),
``edge_agent/methods/X/client.py`` (its ``Client``), ``aggregator/methods/X/server.py`` (its
``Server``); each folder's ``__init__`` re-exports that name. The three registries are built
from :data:`NAMES`; a test checks all three folders exist.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from protocol.errors import ErrorCode, ProtocolError

NAMES: tuple[str, ...] = ("fedit", "slora", "ferret", "fedbiot", "fedpipe", "fedavg")
"""Every method edgefed ships, in the order `--help` lists them."""


class UnknownMethod(ProtocolError):
    code = ErrorCode.UNSUPPORTED_METHOD


class BadParams(ProtocolError):
    code = ErrorCode.BAD_HEADER


PARAMS: Mapping[str, type[BaseModel]] = {
    name: importlib.import_module(f"protocol.methods.{name}").Params for name in NAMES
}


def parse_params(method: str, params: Mapping[str, Any]) -> BaseModel:
    """Validate a task's parameters for ``method``; every problem is listed in the message."""
    try:
        model = PARAMS[method]
    except KeyError:
        raise UnknownMethod(f"unknown method {method!r}; known: {sorted(PARAMS)}") from None
    try:
        return model.model_validate(_over_defaults(model, params))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        raise BadParams(f"invalid {method} parameters: {problems}") from None


def _over_defaults(model: type[BaseModel], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every block the user gave only in part (``[method.train]`` holding just
    ``steps``) completed from that block's default in ``model``: Ferret's ``train`` default
    sets ``lr=0.01``, and a user who sets only ``steps`` keeps it."""
    merged = dict(params)
    for name, field in model.model_fields.items():
        default, given = field.default, merged.get(name)
        if isinstance(default, BaseModel) and isinstance(given, Mapping):
            # only what the method's default sets itself: the rest stays unset (and so still
            # tells "not given", e.g. Ferret's seed falling back to the run's)
            merged[name] = _merge(default.model_dump(exclude_unset=True), given)
    return merged


def _merge(default: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(default)
    for key, value in given.items():
        below = merged.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged
