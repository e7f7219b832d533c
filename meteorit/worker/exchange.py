"""What the HTTP protocol shares with the rest of the worker.

Owns: `Exchange` (one request's place in its connection's response order: the app answers
through it, the protocol writes answers in request order), `ServerState` (what every
connection of one worker shares: the app, the limits, the open connections, the counters of
what the HTTP layer answers or drops itself, the budget of bodies still arriving) and the
`App` interface the protocol dispatches to.
Must not touch: parsing or sockets (meteorit.worker.http), what a request means (the app).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from time import monotonic
from types import SimpleNamespace
from typing import TYPE_CHECKING, Protocol

from .budget import BodyBudget
from .response import JSON_TYPE, build, build_bare

if TYPE_CHECKING:
    from .http import HttpProtocol

# Only these request headers are kept; the rest are counted against the limits and dropped.
# The app may keep more (ServerState.kept_headers), such as the ones events.context records.
KEPT_HEADERS = frozenset((b"content-type", b"content-length", b"content-encoding",
                          b"authorization", b"x-api-key", b"expect", b"origin", b"if-none-match"))


class App(Protocol):
    def dispatch(self, exchange: "Exchange", method: bytes, url: bytes,
                 headers: dict[bytes, bytes], body: bytes) -> None: ...


class ServerState:
    """What every connection of one worker shares."""

    __slots__ = ("app", "limits", "kept_headers", "connections", "stopping", "on_idle", "errors", "abandoned",
                 "budget")

    def __init__(self, app: App, limits: SimpleNamespace, kept_headers: frozenset[bytes] = KEPT_HEADERS) -> None:
        self.app = app
        self.limits = limits
        self.kept_headers = kept_headers  # replaced, not changed, on a hot reload
        self.connections: set[HttpProtocol] = set()
        self.stopping = False
        self.on_idle: asyncio.Event | None = None  # set when the last connection goes
        self.errors: Counter[int] = Counter()  # statuses answered here, before the app saw a request
        self.abandoned = 0  # requests the client half-closed (FIN) before sending them whole
        self.budget = BodyBudget(limits)  # bodies still arriving, over every connection

    def check_timeouts(self) -> None:
        now = monotonic()
        for conn in list(self.connections):
            conn.check_timeout(now)


class Exchange:
    """One request's place in its connection's response order."""

    __slots__ = ("protocol", "connection", "close_after", "data")

    def __init__(self, protocol: "HttpProtocol", connection: bytes, close_after: bool) -> None:
        self.protocol = protocol
        self.connection = connection
        self.close_after = close_after
        self.data: bytes | None = None

    def reply(self, status: int, body: bytes, extra: bytes = b"",
              content_type: bytes = JSON_TYPE) -> None:
        if self.data is not None:
            return
        self.data = build(status, body, self.connection, extra, content_type)
        protocol = self.protocol
        if not protocol.closed:
            protocol.flush()

    def reply_bare(self, status: int, extra: bytes = b"") -> None:
        """A response without content (204, 304)."""
        if self.data is not None:
            return
        self.data = build_bare(status, self.connection, extra)
        protocol = self.protocol
        if not protocol.closed:
            protocol.flush()

    def peer_address(self) -> str | None:
        """The client's IP address as text; None on a unix socket (or once the transport is gone)."""
        transport = self.protocol.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return peer[0] if isinstance(peer, tuple) and peer else None
