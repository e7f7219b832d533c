"""Listening sockets, bound by the master before fork.

Owns: turning `server.listen` addresses into bound, listening, non-blocking sockets, and
(`Listeners`) which of them each worker slot accepts on, across reloads and crashes.
Must not touch: accepting connections (the workers do that), forking, the config.

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

from ..values import parse_listen_address
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


class Listeners:
    """The sockets the workers accept on: one base socket per listen address (bound here
    before fork, or passed by systemd) and, with reuseport, the sockets of each slot.

    `backlog` and `reuseport` need a restart to change, so they are fixed at construction;
    the addresses follow reloads through `bind`.
    """

    def __init__(self, backlog: int, reuseport: bool) -> None:
        self.backlog = backlog
        self.reuseport = reuseport
        self.sockets: list[socket.socket] = []  # one per listen address; unix ones are shared
        self.addresses: list[str] = []  # what each slot binds, with port 0 resolved
        self.activated = False  # the sockets came from systemd socket activation
        self._by_address: dict[str, socket.socket] = {}  # configured address -> its socket
        # base sockets a slot already took (reuseport); the objects, not their id(): an id is
        # reused once a closed socket is freed, which made a fresh socket look taken
        self._claimed: set[socket.socket] = set()
        self._of_slot: dict[int, list[socket.socket]] = {}

    @property
    def configured(self) -> list[str]:
        """The listen addresses as configured (or as systemd named them) of the sockets held."""
        return list(self._by_address)

    def adopt(self, passed: list[tuple[str, socket.socket]]) -> None:
        """Socket activation: systemd's sockets, shared by every slot (a reuseport group
        cannot be grown from sockets we did not bind)."""
        self.activated = True
        self.sockets = [s for _name, s in passed]
        self.addresses = [describe(s) for s in self.sockets]
        self._by_address = dict(zip(self.addresses, self.sockets))

    def bind(self, listen: list[str]) -> None:
        """Listen on `listen`, keeping the open sockets of addresses bound already (a base
        socket closed with its crashed slot is bound afresh). MeteoritError, and nothing
        changed, when one cannot be bound."""
        keep = {a: s for a, s in self._by_address.items() if a in listen and s.fileno() != -1}
        fresh = bind_all([a for a in listen if a not in keep], self.backlog, self.reuseport)
        bound = iter(fresh)
        dropped = [s for a, s in self._by_address.items() if a not in keep]
        self._by_address = {a: keep[a] if a in keep else next(bound) for a in listen}
        self.sockets = list(self._by_address.values())
        self.addresses = [describe(s) for s in self.sockets]  # port 0 resolved
        in_use = {id(s) for socks in self._of_slot.values() for s in socks}
        for s in dropped:
            if id(s) not in in_use:
                s.close()  # no worker accepts on it: out of the kernel's group now

    def of_slot(self, slot: int) -> list[socket.socket]:
        """The shared sockets, or with reuseport this slot's own TCP sockets on the same
        addresses: the first slot to ask takes the ones bound at start (or reload), so no
        socket in the kernel's group is left without a worker accepting on it."""
        if slot not in self._of_slot:
            self._of_slot[slot] = [self._for_slot(s, address) for s, address in zip(self.sockets, self.addresses)]
        return self._of_slot[slot]

    def _for_slot(self, base: socket.socket, address: str) -> socket.socket:
        if self._shared(base):
            return base
        if base not in self._claimed:
            self._claimed = {s for s in self._claimed if s.fileno() != -1}
            self._claimed.add(base)
            return base
        return bind(address, self.backlog, reuseport=True)

    def _shared(self, base: socket.socket) -> bool:
        return base.family == socket.AF_UNIX or not self.reuseport or self.activated

    def fds_besides(self, slot: int) -> set[int]:
        """Every listening socket's fd but `slot`'s: what its worker closes after fork."""
        mine = {s.fileno() for s in self._of_slot.get(slot, [])}
        every = {s.fileno() for socks in self._of_slot.values() for s in socks} | {s.fileno() for s in self.sockets}
        return every - mine - {-1}

    def close_slot(self, slot: int) -> None:
        """Give up `slot`'s sockets, but none another slot or every slot still accepts on."""
        keep = {id(s) for other, socks in self._of_slot.items() if other != slot for s in socks}
        keep |= {id(s) for s in self.sockets if self._shared(s)}
        for s in self._of_slot.pop(slot, []):
            if id(s) not in keep:
                s.close()

    def hand_over(self, old_slot: int, new_slot: int) -> None:
        """With reuseport, the new worker accepts on the old one's sockets (when the
        addresses did not change): closing a socket resets the connections waiting in its
        accept queue, and a socket shared with the successor is never closed."""
        old = self._of_slot.get(old_slot)
        if self.reuseport and old and [describe(s) for s in old] == self.addresses:
            self._of_slot[new_slot] = old

    def close(self) -> None:
        """At exit: every socket closed, and the unix socket files we made removed."""
        for s in self.sockets:
            if s.family == socket.AF_UNIX and not self.activated:  # systemd owns activated paths
                try:
                    os.unlink(s.getsockname())
                except OSError:
                    pass
        for slot in list(self._of_slot):
            self.close_slot(slot)
        for s in self.sockets:
            s.close()
        self.sockets = []
