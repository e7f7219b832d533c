"""The exception hierarchy of meteorit: one base error, a few narrow subclasses.

Errors become exit codes (cli) or HTTP statuses (app) only at the edges.
"""


class MeteoritError(Exception):
    """Base of every error meteorit raises on purpose."""


class ConfigError(MeteoritError):
    """A setting is invalid; names the key and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class EmbeddedRedisError(MeteoritError):
    """The private redis-server could not be started or reached."""


class EventError(MeteoritError):
    """A request's body is not an acceptable batch of events.

    `status` is the HTTP status the edge answers with; `index` is the position of the
    first bad event when the fault is in one event rather than in the whole body.
    """

    def __init__(self, status: int, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.index = index


class WriterUnavailable(MeteoritError):
    """The Redis writer cannot take events now (Redis down or the buffer full)."""


class IpcError(MeteoritError):
    """An IPC operation cannot be done: unknown pid, bad name or data, full queue,
    reply() outside a handler."""
