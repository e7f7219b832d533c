"""Structured logging: one JSON object per line, or text for a person at a terminal.

Owns: the root logger's handler and format (`auto`: text when the lines go to a terminal,
JSON when they go to journald, a file or a pipe, where programs read them), the log file when `log.file` is set (opened
in append mode by every process, so lines of many processes never mix; `reopen` after
USR1 follows a logrotate rename; never opened through a symlink: the master may be
root), and the process's role in every line (`master`, `worker` with its slot). Never
logs API keys or event bodies: callers pass counts and reasons, not payloads.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from typing import Any, TextIO

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


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to `path`; `reopen` opens the path afresh (after logrotate renamed the file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> Any:
        # O_NOFOLLOW: the master may be root and the file's directory the user's (so that
        # workers can reopen it); a symlink planted there must not make root append to, or
        # create, a file elsewhere. A hard link is refused for the same reason.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "it is a symbolic link (not followed: name the real file)",
                              self.path) from None
            raise
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            os.close(fd)
            raise OSError(errno.EMLINK, f"it has {st.st_nlink} hard links (not written through)", self.path)
        # line-buffered: a line leaves in one write() in O_APPEND mode, whole, whoever else writes
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        self.acquire()
        try:
            self.flush()
            self.stream.close()
        finally:
            self.release()
        super().close()

    def reopen(self) -> None:
        old = self.setStream(self._open())  # the open raises OSError before anything changes
        if old is not None:
            old.close()


def setup(level: str = "info", fmt: str = "auto", file: str = "") -> None:
    """Log to stderr, or to `file` when given (OSError if it cannot be opened). Called once
    by the master before it forks (workers keep its handler) and once by the consumer."""
    handler: logging.Handler = ReopenableFileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if resolve_format(fmt, file, sys.stderr) == "text" else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def resolve_format(fmt: str, file: str, stream: TextIO) -> str:
    """"json" or "text": `auto` is text only for stderr on a terminal; a log file is never
    one, and journald, pipes and files are read by programs."""
    if fmt != "auto":
        return fmt
    if file:
        return "json"
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no stream, or a closed one
        return "json"


def reopen() -> str | None:
    """USR1: reopen the log file; returns its path (None when logging to stderr)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                logging.getLogger("meteorit.log").error("cannot reopen %s, logging on to the old file: %s",
                                                        handler.path, exc.strerror)
            return handler.path
    return None
