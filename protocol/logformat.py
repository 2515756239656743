"""Log output for both daemons: the usual text lines, or JSON lines for the journal and shippers.

``--log-format json`` (``edgefed-aggregator serve``, ``edgefed-agent run``) writes one JSON
object per record to stderr: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, and
``exc`` when an exception is attached, plus any ``extra={...}`` fields the code passed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        return json.dumps(body, default=str, ensure_ascii=False)


def configure(level: int, log_format: LogFormat, text_format: str) -> None:
    """Set the root logger: ``level``, to stderr, as text (``text_format``) or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
