"""Faults under load: nothing acknowledged is ever lost.

Each scenario runs the real master and workers against a redis-server of its own, drives
them with the ledgered load generator (tests/ledger.py: client-chosen ids, the fate of
every id), injects one fault, and in the end reads the whole queue: every acknowledged id
must be there (duplicates are allowed: at-least-once).

Sizes come from the environment so bin/meteorit-chaos can run the same scenarios longer:
METEORIT_CHAOS_EVENTS (acknowledged events per scenario, at least), METEORIT_CHAOS_SECONDS
(how long Redis stays away or paused), METEORIT_CHAOS_KILL_SECONDS (how long workers are
killed, one a second; Redis flaps under kill -9 twice as long) and METEORIT_CHAOS_REPORT (a file each scenario's ledger is appended
to, as a JSON line). The defaults keep the whole file within about a minute.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
import redis as redislib
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import REDIS_SERVER, Meteorit, RedisServer, wait_until
from ledger import SPOOLED, Audit, Ledger, Load
from meteorit.worker import spool as spoolfile

pytestmark = [pytest.mark.slow, pytest.mark.faults]

QUEUE = "meteorit:events"
EVENTS = int(os.environ.get("METEORIT_CHAOS_EVENTS", "3000"))
SECONDS = float(os.environ.get("METEORIT_CHAOS_SECONDS", "2.5"))
KILL_SECONDS = float(os.environ.get("METEORIT_CHAOS_KILL_SECONDS", "3"))
REPORT = os.environ.get("METEORIT_CHAOS_REPORT")
KILL_INTERVAL = 1.0  # seconds between two kill -9
DEADLINE = 0.5  # spool.redis_deadline in these tests: a pause of SECONDS is well past it
LOAD_TIMEOUT = 60 + EVENTS / 500  # seconds the load may take to reach EVENTS acknowledged
SETTLE_TIMEOUT = 30 + EVENTS / 5000  # seconds for the spools to be replayed at the end
FILE_SIZE_LIMIT = 1024 * 1024  # RLIMIT_FSIZE of the disk-full scenario
FLAP_SECONDS = 2 * KILL_SECONDS  # how long Redis flaps under kill -9
FLAP_SPOOL_BYTES = "512KiB"  # spool.max_bytes there: full spools, and compactions, happen too


class ChaosRedis(RedisServer):
    """A redis-server of the test's own (stopping it must not disturb other tests), with
    DEBUG allowed, that can stop keeping its data (SHUTDOWN SAVE) or losing it (SIGKILL)."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir,
             "--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.answers, 20, "redis-server")

    def shutdown_keeping_data(self) -> None:
        """Stop the way a maintenance restart does: everything acknowledged is saved first."""
        assert self.proc is not None
        # a client that does not retry: redis-py's default retries the dropped connection
        # with backoff, which made every stop take seconds
        once = redislib.Redis(port=self.port, socket_timeout=20, retry=Retry(NoBackoff(), 0))
        try:
            once.shutdown(save=True)
        finally:
            once.close()
        self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[ChaosRedis]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = ChaosRedis(str(workdir))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.client.close()


@pytest.fixture
def service(meteorit_factory: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> Callable[..., Meteorit]:
    """meteorit on the scenario's Redis, with a short Redis deadline and graceful stop."""
    def make(spool: dict[str, Any] | None = None, start: bool = True, **sections: Any) -> Meteorit:
        settings: dict[str, dict[str, Any]] = {
            "redis": {"url": chaos_redis.url, **sections.pop("redis", {})},
            "server": {"graceful_timeout": 10.0, **sections.pop("server", {})},
            "spool": {"redis_deadline": DEADLINE, **(spool or {})}, **sections}
        return meteorit_factory(settings, start=start)
    return make


def settle(name: str, ledger: Ledger, redis: redislib.Redis, note: str = "") -> Audit:
    """Wait until every acknowledged event is in the queue (spools replay in the
    background), then report the ledger; the caller asserts on it."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        audit = ledger.audit(redis, QUEUE)
        if audit.missing == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    print(f"{name}: {audit.line()}" + (f"; {note}" if note else ""))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"scenario": name, "note": note, **asdict(audit)}) + "\n")
    return audit


def assert_nothing_lost(audit: Audit) -> None:
    assert audit.missing == 0, f"acknowledged but not in Redis: {audit.missing_ids}"
    assert audit.acknowledged >= EVENTS


def live_workers(m: Meteorit) -> list[int]:
    assert m.proc is not None
    pids = []
    for entry in m.logs("worker started"):
        try:
            stat = Path(f"/proc/{entry['worker_pid']}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == m.proc.pid:  # state, parent
            pids.append(entry["worker_pid"])
    return pids


def first_log_after(m: Meteorit, msg: str, seen: int, timeout: float) -> dict[str, Any] | None:
    """The first log entry `msg` after the `seen` ones, or None if none comes in `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        entries = m.logs(msg)[seen:]
        if entries or time.monotonic() > deadline:
            return entries[0] if entries else None
        time.sleep(0.01)


def spool_files(m: Meteorit) -> list[Path]:
    return sorted((m.config.parent / "var" / "spool").glob("*.spool"))


def wait_spooled(ledger: Ledger, count: int, timeout: float) -> None:
    wait_until(lambda: ledger.count(SPOOLED) >= count, timeout, f"{count} events answered from the spool")


# --- workers killed


def test_kill_9_a_random_worker_every_second(service: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> None:
    m = service()
    ledger = Ledger("kill9-")
    kills = 0
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(min(EVENTS, 500), LOAD_TIMEOUT)
        end = time.monotonic() + KILL_SECONDS
        while time.monotonic() < end:
            workers = live_workers(m)
            if workers:
                os.kill(random.choice(workers), signal.SIGKILL)
                kills += 1
            time.sleep(KILL_INTERVAL)
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
    audit = settle("kill -9 a random worker every second", ledger, chaos_redis.client,
                   note=f"{kills} workers killed in {KILL_SECONDS:g} s")
    assert_nothing_lost(audit)
    # fewer kills than seconds: the master's crash-loop backoff keeps a slot empty for a while
    assert kills >= 3
    # the spools of the killed workers were adopted and removed by their successors
    wait_until(lambda: len(spool_files(m)) <= m.workers, 10, "orphan spools to be removed")


def test_kill_9_workers_while_redis_flaps_and_the_spools_replay(service: Callable[..., Meteorit],
                                                                chaos_redis: ChaosRedis) -> None:
    """Redis stopped (keeping its data) and started again, over and over, and a random
    worker killed just after each start, while the spools are being replayed: replays cut
    short, orphans adopted mid-replay by the successors, spools full and compacted."""
    m = service(spool={"max_bytes": FLAP_SPOOL_BYTES}, limits={"max_body": "64KiB"},
                redis={"batch_max_events": 50})  # replays in many chunks: time to be cut short
    ledger = Ledger("flapkill-")
    kills = flaps = 0
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(min(EVENTS, 500), LOAD_TIMEOUT)
        end = time.monotonic() + FLAP_SECONDS
        while time.monotonic() < end:
            chaos_redis.shutdown_keeping_data()
            time.sleep(random.uniform(0.2, 0.6))  # a backlog to replay (or full spools: 503)
            seen = len(m.logs("redis reachable again"))
            chaos_redis.start()
            flaps += 1
            # a worker's probe finds Redis (within 0.5 s) and its replay starts: kill it then
            # (a worker that saw no request during the outage, or a slot empty for the
            # master's crash-loop backoff, logs nothing: then a random worker)
            back = first_log_after(m, "redis reachable again", seen, timeout=2)
            time.sleep(random.uniform(0, 0.05))
            workers = live_workers(m)
            if workers:
                victim = back["pid"] if back and back["pid"] in workers else random.choice(workers)
                os.kill(victim, signal.SIGKILL)
                kills += 1
            time.sleep(random.uniform(0, 0.5))
        load.wait_acknowledged(max(EVENTS, ledger.acknowledged + 500), LOAD_TIMEOUT)
    logged = [e["msg"] for e in m.logs()]
    compactions = sum(1 for msg in logged if msg.startswith("spool compacted"))
    adopted = sum(1 for msg in logged if msg.startswith("replaying the spool of a process that is gone"))
    audit = settle("kill -9 while redis flaps", ledger, chaos_redis.client,
                   note=f"{flaps} restarts of redis, {kills} workers killed, {adopted} spools adopted, "
                        f"{compactions} compacted")
    assert_nothing_lost(audit)
    assert kills >= 3 and audit.spooled > 0
    assert adopted > 0  # some kill hit a worker with a backlog: its successor replayed it
    wait_until(lambda: len(spool_files(m)) <= m.workers, 10, "orphan spools to be removed")


# --- Redis away


def test_redis_stopped_then_restarted(service: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> None:
    m = service()
    ledger = Ledger("down-")
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(EVENTS // 2, LOAD_TIMEOUT)
        chaos_redis.shutdown_keeping_data()
        wait_spooled(ledger, 1, 10)
        time.sleep(SECONDS)  # the outage itself: the load goes on, into the spools
        assert m.request("GET", "/readyz")[0] == 200  # the spool takes events meanwhile
        chaos_redis.start()
        load.wait_acknowledged(ledger.acknowledged + EVENTS // 2, LOAD_TIMEOUT)
    audit = settle("redis stopped then restarted", ledger, chaos_redis.client)
    assert_nothing_lost(audit)
    assert audit.spooled > 0


def test_redis_restarted_empty_still_gets_the_spool(service: Callable[..., Meteorit],
                                                    chaos_redis: ChaosRedis) -> None:
    """Only what was in Redis's queue when it died is Redis's loss: the events meteorit
    answered from its spools before the crash, not replayed yet, must all come back."""
    m = service()
    ledger = Ledger("empty-")
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(EVENTS // 2, LOAD_TIMEOUT)
        # Redis hangs (writes stall past the deadline: requests go to the spools), then dies
        chaos_redis.client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        wait_spooled(ledger, 1, 10)
        ledger.redis_crashed(chaos_redis.client, QUEUE)  # nothing lands in Redis from here on
        spooled_before_the_crash = ledger.count(SPOOLED)
        chaos_redis.stop()  # SIGKILL, no persistence: it comes back empty
        time.sleep(SECONDS)
        chaos_redis.start()
        load.wait_acknowledged(ledger.acknowledged + EVENTS // 2, LOAD_TIMEOUT)
    audit = settle("redis restarted empty", ledger, chaos_redis.client)
    assert audit.missing == 0, f"acknowledged but not in Redis: {audit.missing_ids}"
    assert spooled_before_the_crash > 0 and audit.lost_with_redis > 0


@pytest.mark.parametrize("how", ["client-pause", "debug-sleep"])
def test_redis_paused_past_the_deadline(service: Callable[..., Meteorit], chaos_redis: ChaosRedis,
                                        how: str) -> None:
    m = service()
    ledger = Ledger("pause-")
    pause = max(SECONDS, 4 * DEADLINE)
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(EVENTS // 2, LOAD_TIMEOUT)
        if how == "client-pause":
            chaos_redis.client.execute_command("CLIENT", "PAUSE", int(pause * 1000), "ALL")
            sleeper = None
        else:
            blocked = redislib.Redis(port=chaos_redis.port, socket_timeout=pause + 30)
            sleeper = threading.Thread(target=blocked.execute_command, args=("DEBUG", "SLEEP", pause))
            sleeper.start()
        wait_spooled(ledger, 1, pause + 10)  # answered from the spool past the deadline
        if sleeper is not None:
            sleeper.join()
            blocked.close()
        wait_until(chaos_redis.answers, pause + 10, "the pause to end")
        load.wait_acknowledged(ledger.acknowledged + EVENTS // 2, LOAD_TIMEOUT)
    audit = settle(f"redis paused ({how})", ledger, chaos_redis.client)
    assert_nothing_lost(audit)
    assert audit.spooled > 0


# --- the master stopped under load


def test_master_quit_under_load(service: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> None:
    m = service()
    ledger = Ledger("quit-")
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
        m.signal(signal.SIGQUIT)
        assert m.wait(timeout=30) == 0
    audit = settle("master QUIT under load", ledger, chaos_redis.client)
    assert_nothing_lost(audit)
    assert spool_files(m) == []  # a clean stop with Redis up leaves no spool behind


def test_master_term_under_load_with_events_only_in_the_spool(service: Callable[..., Meteorit],
                                                              chaos_redis: ChaosRedis) -> None:
    m = service()
    ledger = Ledger("term-")
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(EVENTS // 2, LOAD_TIMEOUT)
        chaos_redis.shutdown_keeping_data()
        wait_spooled(ledger, EVENTS // 2, LOAD_TIMEOUT)
        m.signal(signal.SIGTERM)
        assert m.wait(timeout=30) == 0
    assert spool_files(m), "the acknowledged spooled events must be left on disk"
    chaos_redis.start()
    m.start()  # the next start's workers adopt the spools the stopped ones left
    audit = settle("master TERM under load, redis down", ledger, chaos_redis.client)
    assert_nothing_lost(audit)
    assert audit.spooled >= EVENTS // 2


# --- the spool's disk


# RLIMIT_FSIZE is per process and applies to every file it writes: the log (stdout and
# stderr) goes through a pipe to a relay started before the limit, so the limit hits the
# spool files (the only large files meteorit writes) and never a log line.
LOG_RELAY = "import os\nwhile data := os.read(0, 65536):\n    os.write(1, data)\n"
DISK_FULL_LAUNCHER = """\
import os, resource, signal, subprocess, sys
read_end, write_end = os.pipe()
subprocess.Popen([sys.executable, "-c", {relay!r}], stdin=read_end)  # writes to our stdout: the log
os.close(read_end)
os.dup2(write_end, 1)
os.dup2(write_end, 2)
os.close(write_end)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from meteorit.cli import main
sys.exit(main(["-c", {config!r}]))
"""


def test_disk_full_for_the_spool(service: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> None:
    m = service(start=False)
    m.log_path.write_bytes(b"#" * FILE_SIZE_LIMIT + b"\n")  # a log already past the limit
    m.start([sys.executable, "-c", DISK_FULL_LAUNCHER.format(relay=LOG_RELAY, limit=FILE_SIZE_LIMIT,
                                                             config=str(m.config))])
    ledger = Ledger("full-")
    with Load(m.port, ledger) as load:
        load.wait_acknowledged(min(EVENTS, 1000), LOAD_TIMEOUT)
        chaos_redis.shutdown_keeping_data()
        load.wait_status(503, 60)  # the spool files reached the size limit
        wait_until(lambda: m.request("GET", "/readyz")[0] == 503, 10, "/readyz to shed load")
        assert any("spool write" in e["msg"] and "failed" in e["msg"] for e in m.logs())
        chaos_redis.start()
        load.wait_acknowledged(ledger.acknowledged + EVENTS, LOAD_TIMEOUT)
    audit = settle("disk full for the spool", ledger, chaos_redis.client)
    assert_nothing_lost(audit)
    assert audit.spooled > 0 and audit.rejected > 0
    # no corruption: the full files were cut back to whole records, nothing was skipped
    assert not [e for e in m.logs() if "torn" in e["msg"] or "corrupt" in e["msg"]]


def test_a_spool_torn_in_the_middle_of_a_record(service: Callable[..., Meteorit],
                                                chaos_redis: ChaosRedis) -> None:
    m = service(spool={"fsync": "never"})
    chaos_redis.stop()
    wait_until(lambda: len([e for e in m.logs() if e["msg"].startswith("redis unreachable")]) >= 2, 10,
               "both workers to notice")
    ledger = Ledger("torn-")
    with Load(m.port, ledger, connections=4) as load:
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
    assert ledger.count(SPOOLED) == ledger.acknowledged
    m.stop()  # kill -9 the master and the workers: their spools stay behind
    victim = max(spool_files(m), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    parsed = spoolfile.parse_frames(data[spoolfile.HEADER_SIZE:], at_eof=True)
    assert parsed.problems == [] and parsed.records
    last = spoolfile.HEADER_SIZE + _last_frame_offset(data[spoolfile.HEADER_SIZE:])
    torn_ids = [orjson.loads(r)["id"] for r in spoolfile.parse_frames(data[last:], at_eof=True).records]
    with open(victim, "r+b") as f:
        f.truncate(last + spoolfile.FRAME_SIZE + 7)  # cut inside the last record's payload
    ledger.destroy([int(event_id[len(ledger.prefix):]) for event_id in torn_ids])

    chaos_redis.start()
    m.start()
    wait_until(lambda: any("torn record" in e["msg"] for e in m.logs()), 20, "the torn record to be reported")
    audit = settle("spool truncated mid-record", ledger, chaos_redis.client)
    assert_nothing_lost(audit)  # everything around the torn record was replayed
    assert (audit.destroyed, audit.destroyed_found) == (len(torn_ids), 0)  # and nothing of it
    for raw in chaos_redis.client.lrange(QUEUE, 0, -1):  # no garbage replayed
        assert orjson.loads(raw)["id"].startswith(ledger.prefix)


def _last_frame_offset(buf: bytes) -> int:
    pos = last = 0
    while pos < len(buf):
        last = pos
        pos += spoolfile.FRAME_SIZE + int.from_bytes(buf[pos + 4:pos + 8], "big")
    return last


# --- backpressure


def test_queue_length_cap_sheds_load_until_the_consumer_catches_up(service: Callable[..., Meteorit],
                                                                    chaos_redis: ChaosRedis) -> None:
    m = service(redis={"max_queue_length": 50})
    batch = [{"type": "cap"}] * 10
    statuses = [m.post(batch)[0] for _ in range(20)]
    assert statuses[:5] == [202] * 5 and statuses[-1] == 503
    status, headers, body = m.request("POST", "/v1/events", json.dumps(batch),
                                      {"Content-Type": "application/json"})
    assert status == 503 and headers["Retry-After"] == "1" and b"max_queue_length" in body
    # a worker no POST reached learns the length from its once-a-second LLEN
    wait_until(lambda: all(m.request("GET", "/readyz")[0] == 503 for _ in range(4)), 5,
               "/readyz 503 on every worker")
    length = chaos_redis.client.llen(QUEUE)
    assert 50 < length <= 50 + 2 * 10  # past the cap by at most one batch per worker
    chaos_redis.client.ltrim(QUEUE, 1, 0)  # the consumer catches up
    wait_until(lambda: all(m.request("GET", "/readyz")[0] == 200 for _ in range(4)), 10,
               "/readyz on every worker")
    assert m.post(batch)[0] == 202


def test_spool_cap_gives_503_with_retry_after(service: Callable[..., Meteorit], chaos_redis: ChaosRedis) -> None:
    m = service(spool={"max_bytes": "8KiB"}, limits={"max_body": "4KiB"})
    chaos_redis.shutdown_keeping_data()
    wait_until(lambda: len([e for e in m.logs() if e["msg"].startswith("redis unreachable")]) >= 2, 10,
               "both workers to notice")
    batch = [{"type": "cap", "pad": "x" * 200}] * 5
    replies = [m.post(batch) for _ in range(40)]
    assert replies[0] == (202, {"accepted": 5, "spooled": True})
    assert replies[-1][0] == 503 and "spool is full" in replies[-1][1]["error"]
    assert m.request("GET", "/readyz")[0] == 503
    spooled = sum(1 for status, _ in replies if status == 202)
    chaos_redis.start()
    wait_until(lambda: chaos_redis.client.llen(QUEUE) == spooled * 5, 10, "the spools to be replayed")
    wait_until(lambda: m.request("GET", "/readyz")[0] == 200, 10, "/readyz once the spools are empty")
