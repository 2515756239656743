"""Per-method wire specs: each method's task parameters, validated the same way on both sides.

``protocol/methods/X.py`` defines ``Params`` (a pydantic model) for method ``X``; this registry
maps method names to them. The agent and aggregator each keep a registry of their own halves
with the same names (a test checks that every method has all three files).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from protocol.errors import ErrorCode, ProtocolError
from protocol.methods import fedit


class UnknownMethod(ProtocolError):
    code = ErrorCode.UNSUPPORTED_METHOD


class BadParams(ProtocolError):
    code = ErrorCode.BAD_HEADER


PARAMS: Mapping[str, type[BaseModel]] = {
    "fedit": fedit.Params,
}


def parse_params(method: str, params: Mapping[str, Any]) -> BaseModel:
    """Validate a task's parameters for ``method``; every problem is listed in the message."""
    try:
        model = PARAMS[method]
    except KeyError:
        raise UnknownMethod(f"unknown method {method!r}; known: {sorted(PARAMS)}") from None
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        raise BadParams(f"invalid {method} parameters: {problems}") from None
