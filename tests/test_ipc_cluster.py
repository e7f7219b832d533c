"""The IPC bus between the real master and real workers, driven through the probe
plugin (tests/ipc_probe.py) that each worker imports via `server.plugins`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import Meteorit, RedisServer, wait_until

pytestmark = pytest.mark.slow
TESTS_DIR = str(Path(__file__).resolve().parent)


class Probe:
    """One worker's probe socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.slot, self.pid = (int(x) for x in path.stem[1:].split("-"))

    def __call__(self, op: str, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.path))
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                part = s.recv(1 << 20)
                if not part:
                    break
                data += part
        answer = json.loads(data)
        if "error" in answer:
            raise ProbeError(answer["error"])
        return answer["ok"]

    def received(self, name: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self("received") if name is None or r["name"] == name]


class ProbeError(Exception):
    pass


class Cluster:
    def __init__(self, meteorit: Meteorit, probe_dir: Path) -> None:
        self.meteorit = meteorit
        self.probe_dir = probe_dir

    def probes(self) -> dict[int, Probe]:
        """slot → probe of the workers alive now, once each of them listens."""
        pids = self.meteorit.worker_pids()

        def ready() -> dict[int, Probe] | None:
            found = {p.slot: p for p in map(Probe, self.probe_dir.glob("w*.sock")) if pids.get(p.slot) == p.pid}
            return found if len(found) == len(pids) else None
        return wait_until(ready, 20, "every worker's probe socket")


@pytest.fixture
def cluster(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
            tmp_path: Path) -> Cluster:
    probe_dir = tmp_path / "probes"
    probe_dir.mkdir()
    env = {"METEORIT_PROBE_DIR": str(probe_dir),
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    m = meteorit_factory({"redis": {"url": redis_server.url},
                          "server": {"workers": 3, "plugins": ["ipc_probe"]}}, env=env)
    return Cluster(m, probe_dir)


def test_broadcast_reaches_every_worker_exactly_once(cluster: Cluster) -> None:
    probes = cluster.probes()
    probes[0]("broadcast", name="probe.record", data="hello all")
    for probe in probes.values():
        wait_until(lambda: probe.received("probe.record"), 10, "the broadcast")
    for probe in probes.values():
        [got] = probe.received("probe.record")
        assert (got["sender"], got["head"]) == (probes[0].pid, "hello all")


def test_reply_returns_to_the_sender_and_sender_is_right(cluster: Cluster) -> None:
    probes = cluster.probes()
    a, b = probes[0], probes[1]
    assert a("request", pid=b.pid, name="probe.echo", data="ping?") == "ping?"
    assert a("request", pid=b.pid, name="probe.whoami") == str(a.pid)
    assert b("request", pid=a.pid, name="probe.whoami") == str(b.pid)
    replies = a("gather", name="probe.whoami")
    assert replies == {str(p.pid): str(a.pid) for p in probes.values()}
    a("send", pid=b.pid, name="probe.echo", data="plain send")  # the reply comes back as an alert
    wait_until(lambda: a.received("probe.echo-reply"), 10, "the echo reply")
    [reply] = a.received("probe.echo-reply")
    assert (reply["sender"], reply["head"]) == (b.pid, "plain send")


def test_send_to_an_unknown_pid_errors(cluster: Cluster) -> None:
    probe = cluster.probes()[0]
    with pytest.raises(ProbeError, match="no process with pid 999999"):
        probe("send", pid=999999, name="probe.record", data="x")
    with pytest.raises(ProbeError, match="name"):
        probe("send", pid=probe.pid, name="n" * 256, data="x")


def test_a_10_mib_alert_arrives_intact_while_small_alerts_flow(cluster: Cluster) -> None:
    probes = cluster.probes()
    big, small, target = probes[0], probes[1], probes[2]
    size = 10 * 1024 * 1024
    big("send", pid=target.pid, name="probe.record", data="0123456789abcdef", size=size)
    assert small("spam", pid=target.pid, name="probe.record", count=2000, data="s", size=10) == 2000
    wait_until(lambda: len(target.received("probe.record")) == 2001, 30, "every alert")
    got = target.received("probe.record")
    [large] = [r for r in got if r["size"] == size]
    expected = ("0123456789abcdef" * (size // 16)).encode()
    assert large["sha"] == hashlib.sha256(expected).hexdigest()
    assert large["sender"] == big.pid
    smalls = [r["head"].split(":")[0] for r in got if r["sender"] == small.pid]
    assert smalls == [str(i) for i in range(2000)]  # in order, none lost
    assert target("stats")["corrupt"] == 0


def test_a_worker_that_stops_reading_blocks_nobody(cluster: Cluster) -> None:
    probes = cluster.probes()
    sender, stuck, other = probes[0], probes[1], probes[2]
    stuck("stop_reading")
    # 1 MiB alerts until the sender's bounded queue for the stuck worker refuses
    accepted = sender("spam", pid=stuck.pid, name="probe.record", count=200, size=1 << 20, stop_on_full=True)
    assert 0 < accepted < 200
    assert sender("stats")["queued_bytes"] > 0
    # the sender's loop is not blocked and other destinations still get their alerts
    assert sender("spam", pid=other.pid, name="probe.record", count=100, data="o", size=10) == 100
    wait_until(lambda: len(other.received("probe.record")) == 100, 10, "alerts to the other worker")
    assert cluster.meteorit.request("GET", "/healthz")[0] == 200
    stuck("start_reading")
    wait_until(lambda: len(stuck.received("probe.record")) == accepted, 60, "the queued alerts")
    heads = [int(r["head"].split(":")[0]) for r in stuck.received("probe.record")]
    assert heads == list(range(accepted))
    wait_until(lambda: sender("stats")["queued_bytes"] == 0, 10, "the queue to drain")


def test_worker_killed_mid_alert_does_not_wedge_the_bus(cluster: Cluster) -> None:
    probes = cluster.probes()
    victim, target, witness = probes[0], probes[1], probes[2]
    target("stop_reading")
    victim("send", pid=target.pid, name="probe.record", data="v", size=8 << 20)  # part in the pipe, part queued
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: cluster.meteorit.worker_pids()[0] != victim.pid, 10, "the respawn")
    target("start_reading")
    fresh = cluster.probes()[0]
    fresh("send", pid=target.pid, name="probe.record", data="after")
    witness("send", pid=target.pid, name="probe.record", data="witness")
    wait_until(lambda: len(target.received("probe.record")) == 2, 10, "alerts after the kill")
    assert {r["head"] for r in target.received("probe.record")} == {"after", "witness"}
    wait_until(lambda: target("stats")["partial_bytes"] == 0, 10, "the dead sender's partial to be freed")


def test_respawned_worker_reads_nothing_stale(cluster: Cluster) -> None:
    probes = cluster.probes()
    victim, sender = probes[1], probes[2]
    victim("stop_reading")
    assert sender("spam", pid=victim.pid, name="probe.record", count=50, data="old", size=100) == 50
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: cluster.meteorit.worker_pids()[1] != victim.pid, 10, "the respawn")
    successor = cluster.probes()[1]
    sender("send", pid=successor.pid, name="probe.record", data="new")
    wait_until(lambda: successor.received("probe.record"), 10, "the alert to the successor")
    assert [r["head"] for r in successor.received("probe.record")] == ["new"]
    assert successor("stats")["stale"] >= 1
    with pytest.raises(ProbeError, match="no process"):
        sender("send", pid=victim.pid, name="probe.record", data="to the dead")
