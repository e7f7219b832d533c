"""Listeners, the master's listening sockets per worker slot, with real sockets and no
worker: with reuseport each slot accepts on its own socket of the address, the first slot
on the one bound at start; unix, activated and non-reuseport sockets are shared; a socket
is closed only when no slot accepts on it, and handed over from a replaced worker to its
successor. The kernel's side (connections spread, none reset) is test_service.py's."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from meteorit.errors import MeteoritError
from meteorit.master.listeners import Listeners, bind, describe


def is_open(sock: socket.socket) -> bool:
    return sock.fileno() != -1


@pytest.fixture
def tcp() -> Iterator[Listeners]:
    listeners = Listeners(backlog=16, reuseport=True)
    listeners.bind(["127.0.0.1:0"])
    yield listeners
    listeners.close()


def test_with_reuseport_the_first_slot_takes_the_bound_socket_and_the_others_their_own(tcp: Listeners) -> None:
    (base,) = tcp.sockets
    assert tcp.addresses == [describe(base)] and not tcp.addresses[0].endswith(":0")  # port 0 resolved
    assert tcp.of_slot(0) == [base]
    (own,) = tcp.of_slot(1)
    assert own is not base and describe(own) == tcp.addresses[0]
    assert own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert tcp.of_slot(1) == [own]  # asked again: the same
    assert tcp.fds_besides(0) == {own.fileno()} and tcp.fds_besides(1) == {base.fileno()}


def test_a_crashed_slot_gives_up_its_sockets_and_its_respawn_binds_afresh(tcp: Listeners) -> None:
    (base,) = tcp.sockets
    tcp.of_slot(0)
    (own,) = tcp.of_slot(1)
    tcp.close_slot(0)
    assert not is_open(base) and is_open(own)  # out of the kernel's group: no backlog nobody accepts
    (fresh,) = tcp.of_slot(0)
    assert is_open(fresh) and fresh is not own and describe(fresh) == tcp.addresses[0]
    tcp.bind(tcp.configured)  # a reload: the closed base socket is bound afresh, not reused
    assert is_open(tcp.sockets[0]) and tcp.sockets[0] is not base


def test_a_replacement_accepts_on_the_sockets_of_the_worker_it_replaces(tcp: Listeners) -> None:
    old = tcp.of_slot(0)
    tcp.hand_over(0, 2)
    assert tcp.of_slot(2) == old
    tcp.close_slot(0)  # the old worker retires
    assert all(is_open(s) for s in old)  # its accept queue was not reset
    assert tcp.fds_besides(2) == set()


def test_a_reload_keeps_the_sockets_of_unchanged_addresses_and_closes_dropped_ones(tcp: Listeners) -> None:
    (kept,) = tcp.sockets
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    other = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    tcp.bind([*tcp.configured, other])
    assert tcp.sockets[0] is kept and len(tcp.sockets) == 2 and tcp.configured == ["127.0.0.1:0", other]
    added = tcp.sockets[1]
    tcp.bind(["127.0.0.1:0"])
    assert tcp.sockets == [kept] and not is_open(added)


def test_a_dropped_address_stays_open_while_a_slot_accepts_on_it(tcp: Listeners) -> None:
    (base,) = tcp.sockets
    tcp.of_slot(0)
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    other = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    tcp.bind([other])
    assert is_open(base)  # the worker of slot 0 still serves on it until it is replaced
    tcp.close_slot(0)
    assert not is_open(base)


def test_a_failed_bind_changes_nothing(tcp: Listeners) -> None:
    before = list(tcp.sockets)
    taken = bind("127.0.0.1:0", 16)
    try:
        with pytest.raises(MeteoritError, match="cannot listen on"):
            tcp.bind([*tcp.configured, describe(taken)])
    finally:
        taken.close()
    assert tcp.sockets == before and tcp.configured == ["127.0.0.1:0"]


def test_unix_sockets_are_shared_by_every_slot_and_their_file_removed_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listeners = Listeners(backlog=16, reuseport=True)
    listeners.bind([f"unix:{path}"])
    (base,) = listeners.sockets
    assert listeners.of_slot(0) == [base] and listeners.of_slot(1) == [base]
    listeners.close_slot(0)
    assert is_open(base) and listeners.fds_besides(1) == set()
    listeners.close()
    assert not is_open(base) and not path.exists()


def test_without_reuseport_every_slot_shares_one_socket() -> None:
    listeners = Listeners(backlog=16, reuseport=False)
    listeners.bind(["127.0.0.1:0"])
    try:
        (base,) = listeners.sockets
        assert listeners.of_slot(0) == [base] and listeners.of_slot(1) == [base]
        listeners.close_slot(0)
        assert is_open(base)
        listeners.hand_over(1, 2)
        assert listeners.of_slot(2) == [base]
    finally:
        listeners.close()


def test_activated_sockets_are_shared_and_their_files_left_to_systemd(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.bind(str(path))
    passed.listen()
    tcp = bind("127.0.0.1:0", 16, reuseport=True)
    listeners = Listeners(backlog=16, reuseport=True)
    listeners.adopt([("http", tcp), ("unix", passed)])
    assert listeners.activated and listeners.addresses == [describe(tcp), f"unix:{path}"]
    assert listeners.of_slot(0) == [tcp, passed] and listeners.of_slot(1) == [tcp, passed]  # no group to grow
    listeners.close()
    assert not is_open(tcp) and path.exists()
    os.unlink(path)
