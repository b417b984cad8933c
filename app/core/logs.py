"""Log set-up for every qaas process: text for a person at a terminal, or one JSON object per line for a log
pipeline (QAAS_LOG_FORMAT=json). Lines logged while a worker handles a job carry its job_id and tenant_id.

Stdlib only: a small Formatter gives exactly the keys we document. The server and worker commands
(`app/commands.py`, `workers/commands.py`) call `configure()`; the client commands do not log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_KEYS = ("job_id", "tenant_id", "worker")

_context: ContextVar[Mapping[str, str]] = ContextVar("qaas_log_context", default=MappingProxyType({}))

# What every LogRecord has; anything else on a record came from `extra=` and is written too. uvicorn's
# color_message repeats the message with terminal escapes.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Within the block (this thread or task only), every log record carries `fields`, e.g. job_id."""
    token = _context.set(MappingProxyType({**_context.get(), **fields}))
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str) -> None:
    """Add fields to the current log_context once they are known (the enclosing block still resets them)."""
    _context.set(MappingProxyType({**_context.get(), **fields}))


class ContextFilter(logging.Filter):
    """Copies the current log_context onto each record (on the handler: records of every logger pass it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def _jsonable(value: Any) -> Any:
    """`value` when it serializes to strict JSON, else its str() (NaN, objects, bytes, cycles...)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        try:
            return str(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then job_id, tenant_id, worker when known, fields
    given with `extra=`, and exc_info (the traceback as text) on errors."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: keep both rather than lose the line
            message = f"{record.msg!s} {record.args!r}"
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key in CONTEXT_KEYS:
            if getattr(record, key, None) is not None:
                entry[key] = _jsonable(getattr(record, key))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                entry.setdefault(key, _jsonable(value))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def log_format() -> str:
    """QAAS_LOG_FORMAT: `json`, or `text` (the default, and what an unknown value gets: `configure` warns)."""
    value = os.environ.get("QAAS_LOG_FORMAT", "").strip().lower()
    return value if value in FORMATS else "text"


def configure(level: int = logging.INFO) -> None:
    """One handler on the root logger, on stderr, in the format QAAS_LOG_FORMAT names."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format() == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)  # warnings (e.g. Celery's as root) become JSON lines too
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    asked = os.environ.get("QAAS_LOG_FORMAT", "").strip()
    if asked and asked.lower() not in FORMATS:
        # A typo must not stop the service (nor a client command): say it, and log as text.
        logging.getLogger("qaas").warning(
            "QAAS_LOG_FORMAT=%r is not a log format: logging as text; set it to 'text' or 'json'", asked
        )


def uvicorn_log_config() -> dict[str, Any] | None:
    """uvicorn's own logging config for text; None with JSON, so that its error and access loggers propagate
    to the root handler set up by `configure` and its formatter."""
    if log_format() == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
