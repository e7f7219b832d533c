"""Structured logging: one JSON object per line on stderr (or `text` for humans).

Owns: the root logger's handler and format, and the process's role in every line
(`master`, `worker` with its slot). Never logs API keys or event bodies: callers pass
counts and reasons, not payloads.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_role: dict[str, Any] = {"role": "master"}

# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def set_role(role: str, **fields: Any) -> None:
    """Name this process in every following line (called once after fork)."""
    _role.clear()
    _role.update(role=role, **fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "pid": record.process,
            **_role,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        who = _role.get("role", "?") + (f"[{_role['slot']}]" if "slot" in _role else "")
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = (f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7} "
                f"{who} {record.process} {record.getMessage()}" + (f" {extra}" if extra else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
