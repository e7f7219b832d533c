"""Real distributed Redis for the tests: a Redis Cluster of 3 primaries and 3 replicas, and
a Sentinel set of 1 primary, 1 replica and 3 sentinels, each process a real redis-server
on a free port, in a directory of the test's own.

Both are context managers: every process is started in a session of its own and stopped
by its pid with killpg on the way out, also when the set-up itself fails half way. They
wait on readiness, never on a bare sleep: the cluster on `CLUSTER INFO` saying
cluster_state:ok on every node, each primary's replica linked, every node agreeing on the
slot map; the sentinel set on each sentinel naming the primary and knowing the replica
and the other sentinels.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redislib
from redis.cluster import RedisCluster

from conftest import REDIS_SERVER, free_port, wait_until

REDIS_CLI = "redis-cli"
READY_TIMEOUT = 60.0  # a busy 2-core machine can take a while to elect and sync
NODE_TIMEOUT_MS = 2000  # cluster-node-timeout: how long a silent primary takes to be failed over
SENTINEL_DOWN_MS = 1000  # down-after-milliseconds of the sentinels
SERVICE = "meteoritq"  # the name the sentinels monitor


def _client(port: int) -> redislib.Redis:
    return redislib.Redis(port=port, socket_timeout=5, socket_connect_timeout=2)


def answers(port: int) -> bool:
    try:
        with _client(port) as c:
            return bool(c.ping())
    except redislib.RedisError:
        return False


def _info(port: int, section: str) -> dict[str, Any]:
    try:
        with _client(port) as c:
            return c.info(section)
    except redislib.RedisError:
        return {}


@dataclass
class Node:
    """One redis-server process of a cluster or a sentinel set."""

    port: int
    workdir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        try:
            self.proc = subprocess.Popen([REDIS_SERVER or "redis-server", *self.args], cwd=self.workdir,
                                         stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        wait_until(lambda: self._alive() and answers(self.port), READY_TIMEOUT, f"redis on {self.port}")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server on {self.port} exited with {self.proc.returncode}: "
                                 f"{(self.workdir / 'redis.log').read_text()[-2000:]}")
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process by its pid (its own session: killpg reaches nothing else)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=20)
        self.proc = None

    def client(self) -> redislib.Redis:
        return _client(self.port)


@dataclass
class Cluster:
    """3 primaries and 3 replicas, made with `redis-cli --cluster create`."""

    workdir: Path
    nodes: list[Node] = field(default_factory=list)

    def __enter__(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        for i in range(6):
            port = free_port()
            self.nodes.append(Node(port, self.workdir / f"node{i}", [
                "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-port", str(free_port()),  # not port + 10000: that may be taken, or past 65535
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "", "--appendonly", "no", "--enable-debug-command", "yes",
                "--repl-diskless-sync-delay", "0",  # replicas in sync at once, not 5 s later
                # as the README advises: the other primaries keep taking writes while one fails over
                "--cluster-require-full-coverage", "no"]))
        for node in self.nodes:
            node.start()
        subprocess.run([REDIS_CLI, "--cluster", "create", *(n.address for n in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=READY_TIMEOUT)
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes if n.proc is not None][:3]

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None]

    def node(self, address: str) -> Node:
        return next(n for n in self.nodes if n.address == address)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.live()[0].port, socket_timeout=10)

    def topology(self) -> dict[str, list[str]]:
        """primary address -> its replicas' addresses, as a live node sees it."""
        with self.live()[0].client() as c:
            lines = c.execute_command("CLUSTER", "NODES").decode().splitlines()
        ids: dict[str, str] = {}
        primaries: dict[str, list[str]] = {}
        for line in lines:
            fields = line.split()
            address = fields[1].split("@")[0]
            ids[fields[0]] = address
            if "master" in fields[2] and "fail" not in fields[2]:
                primaries.setdefault(address, [])
        for line in lines:
            fields = line.split()
            if "slave" in fields[2] and "fail" not in fields[2] and fields[3] in ids:
                primaries.setdefault(ids[fields[3]], []).append(fields[1].split("@")[0])
        return primaries

    def primary_of(self, key: str) -> str:
        with self.client() as c:
            node = c.get_node_from_key(key)
            return node.name

    def wait_healthy(self, primaries: int = 3, replicas: int = 1) -> None:
        """Every live node sees the cluster ok with the same slot map, and each of the
        `primaries` primaries has `replicas` replicas linked and in sync."""
        def healthy() -> bool:
            maps = set()
            for node in self.live():
                info = _cluster_info(node.port)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != "16384":
                    return False
                maps.add(_slot_owners(node.port))
            if len(maps) != 1:
                return False
            topology = self.topology()
            if len(topology) != primaries or any(len(r) < replicas for r in topology.values()):
                return False
            # every replica synced: one still loading its first copy could not take over
            return all(_info(self.node(r).port, "replication").get("master_link_status") == "up"
                       for rs in topology.values() for r in rs)
        wait_until(healthy, READY_TIMEOUT, "the cluster to be ok with every replica linked")


def _cluster_info(port: int) -> dict[str, str]:
    try:
        with _client(port) as c:
            text = c.execute_command("CLUSTER", "INFO").decode()
    except redislib.RedisError:
        return {}
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _slot_owners(port: int) -> tuple[tuple[int, int, str], ...]:
    try:
        with _client(port) as c:
            slots = c.execute_command("CLUSTER", "SLOTS")
    except redislib.RedisError:
        return ()
    return tuple(sorted((int(s[0]), int(s[1]), f"{s[2][0].decode()}:{s[2][1]}") for s in slots))


@dataclass
class SentinelSet:
    """A primary, its replica and 3 sentinels monitoring them as SERVICE."""

    workdir: Path
    primary: Node | None = None
    replica: Node | None = None
    sentinels: list[Node] = field(default_factory=list)

    def __enter__(self) -> "SentinelSet":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        data = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "yes",
                "--repl-diskless-sync-delay", "0"]
        port = free_port()
        self.primary = Node(port, self.workdir / "primary", ["--port", str(port), *data])
        self.primary.start()
        port = free_port()
        self.replica = Node(port, self.workdir / "replica",
                            ["--port", str(port), "--replicaof", "127.0.0.1", str(self.primary.port), *data])
        self.replica.start()
        wait_until(lambda: _info(self.replica.port, "replication").get("master_link_status") == "up"  # type: ignore[union-attr]
                   and _info(self.primary.port, "replication").get("connected_slaves") == 1,  # type: ignore[union-attr]
                   READY_TIMEOUT, "the replica to sync")
        for i in range(3):
            port = free_port()
            workdir = self.workdir / f"sentinel{i}"
            workdir.mkdir(parents=True)
            conf = workdir / "sentinel.conf"  # sentinels rewrite their config: a file of their own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {SENTINEL_DOWN_MS}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels.append(Node(port, workdir, [str(conf), "--sentinel"]))
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_agree, READY_TIMEOUT, "the sentinels to know the primary, replica and each other")

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    state = c.sentinel_master(SERVICE)
            except redislib.RedisError:
                return False
            if (state["num-slaves"] < 1 or state["num-other-sentinels"] < 2 or not state["is_master"]
                    or state["is_sdown"] or state["is_odown"]):
                return False
        return True

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def master_port(self) -> int | None:
        """The primary's port as the sentinels agree on it now (None while they differ)."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    _, port = c.sentinel_get_master_addr_by_name(SERVICE)
            except redislib.RedisError:
                return None
            ports.add(int(port))
        return ports.pop() if len(ports) == 1 else None

    def wait_failover(self, old_port: int, timeout: float = READY_TIMEOUT) -> int:
        """Block until every sentinel names a primary other than `old_port` that answers as a
        primary; its port."""
        def promoted() -> int | None:
            port = self.master_port()
            if port is None or port == old_port:
                return None
            role = _info(port, "replication").get("role")
            return port if role == "master" else None
        return wait_until(promoted, timeout, "the sentinels to fail over")

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            if node is not None:
                node.kill()

