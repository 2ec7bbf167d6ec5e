"""Structured logging for the daemon.

Contract:
- ``setup_logging(level, fmt, stream=None)`` configures the ``ctxdp`` logger
  tree (not the root logger, so libraries keep their own settings) with one
  handler writing to ``stream`` (default stderr, which systemd's journal
  captures). Calling it again replaces that handler: a reload may change the
  level or format.
- ``fmt="json"`` writes one JSON object per line with ``ts`` (RFC 3339 UTC),
  ``level``, ``logger``, ``msg`` and, merged at top level, the fields of a
  ``ctx`` dict passed as ``extra={"ctx": {...}}``; an exception adds
  ``exc``. Core keys win over ``ctx`` keys of the same name. Values that are
  not JSON-able are rendered with ``str``.
- ``fmt="text"`` writes ``TIME LEVEL logger: msg key=value ...``.
- A log line is always one line: newlines in messages are escaped.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_CORE = ("ts", "level", "logger", "msg", "exc")
_HANDLER_ATTR = "_ctxdp_handler"


def _ts(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


def _ctx(record: logging.LogRecord) -> dict[str, Any]:
    ctx = getattr(record, "ctx", None)
    return ctx if isinstance(ctx, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        for k, v in _ctx(record).items():
            if str(k) not in _CORE:
                out[str(k)] = v
        out.update(
            ts=_ts(record.created),
            level=record.levelname.lower(),
            logger=record.name,
            msg=record.getMessage(),
        )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable single line with ``key=value`` context."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record.created), record.levelname, f"{record.name}:", record.getMessage()]
        for k, v in _ctx(record).items():
            s = str(v)
            quote = not s or any(c in s for c in ' "=')
            parts.append(f"{k}={json.dumps(s) if quote else s}")
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line.replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(level: str | int = "info", fmt: str = "text", stream: IO[str] | None = None):
    """Configure the ``ctxdp`` logger; returns it. See the module docstring."""
    if isinstance(level, str):
        lvl = logging.getLevelName(level.upper())
        if not isinstance(lvl, int):
            raise ValueError(f"unknown log level {level!r}")
    else:
        lvl = level
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    logger = logging.getLogger("ctxdp")
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_ATTR, False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_ATTR, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False  # our handler is the only sink; no duplicate lines via root
    return logger
