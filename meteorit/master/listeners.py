"""Listening sockets, bound by the master before fork.

Owns: turning `server.listen` addresses into bound, listening, non-blocking sockets.
Must not touch: accepting connections (the workers do that).

With `server.reuseport` (the default), each worker slot gets its own TCP socket on the
same address (SO_REUSEPORT) and the kernel spreads new connections over them. One shared
socket lets the first worker to wake accept a whole burst (uvloop accepts until EAGAIN):
measured with wrk -c64, a third of the runs had one worker holding all 64 connections
and ran at 60% of the throughput. Unix sockets are always shared.
"""

from __future__ import annotations

import os
import socket
import stat

from ..config import parse_listen_address
from ..errors import MeteoritError


def bind(address: str, backlog: int, reuseport: bool = False) -> socket.socket:
    family, where = parse_listen_address(address)
    if family == "unix":
        _remove_stale_unix_socket(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(where)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise MeteoritError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind_all(addresses: list[str], backlog: int, reuseport: bool = False) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(bind(address, backlog, reuseport and not address.startswith("unix:")))
    except MeteoritError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    if isinstance(name, bytes):  # an abstract unix socket, as systemd may pass one
        return "unix:@" + name.lstrip(b"\0").decode(errors="replace")
    host, port = name[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a previous run would make bind() fail; remove only sockets."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
