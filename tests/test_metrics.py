"""Counters across workers: /metrics and /v1/stats sum what every worker counted, a worker
that does not answer is reported missing, and per-key rate limits hold across workers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from typing import Callable

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until
from meteorit import metrics

pytestmark = pytest.mark.slow

SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(tuple(p.split("=", 1)) for p in re.findall(r'\w+="[^"]*"', labels or ""))
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def served(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
           redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url}})


def test_metrics_sum_what_every_worker_counted(served: Meteorit, redis: redislib.Redis) -> None:
    for _ in range(5):
        assert served.post({"type": "one"})[0] == 202
    for _ in range(3):
        assert served.post([{"type": "ten"}] * 10)[0] == 202
    for _ in range(2):
        assert served.post({"no": "type"})[0] == 400
    assert served.post("{}", content_type="application/xml")[0] == 415
    status, headers, body = served.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    found = samples(text)
    assert total(found, "meteorit_events_accepted_total") == 35 == redis.llen("meteorit:events")
    assert total(found, "meteorit_requests_total", status="202") == 8
    assert total(found, "meteorit_requests_total", status="400") == 2
    assert total(found, "meteorit_requests_total", status="415") == 1
    assert total(found, "meteorit_events_rejected_total", reason="invalid") == 2
    assert total(found, "meteorit_events_rejected_total", reason="unsupported_media_type") == 1
    assert total(found, "meteorit_request_duration_seconds_count") >= 11
    assert total(found, "meteorit_redis_batch_size_count") == total(found, "meteorit_redis_writes_total") >= 1
    assert total(found, "meteorit_workers") == 2 and total(found, "meteorit_workers_missing") == 0
    assert total(found, "meteorit_master_up") == 1
    assert total(found, "meteorit_events_spooled_total") == 0  # Redis took everything
    assert total(found, "meteorit_worker_restarts_total") == 0
    per_worker = [v for (name, labels), v in found.items()
                  if name == "meteorit_events_accepted_total" and dict(labels).get("worker")]
    assert len(per_worker) == 2 and sum(per_worker) == 35
    # the +Inf bucket of a histogram holds every observation
    assert total(found, "meteorit_request_duration_seconds_bucket", le="+Inf") == \
        total(found, "meteorit_request_duration_seconds_count")

    status, _, body = served.request("GET", "/v1/stats")
    stats = json.loads(body)
    assert status == 200 and stats["total"]["events_accepted"] == 35
    assert stats["missing_workers"] == [] and stats["master"]["pid"] == served.proc.pid
    assert served.request("POST", "/metrics")[0] == 405


def test_what_a_worker_sees_now_is_per_worker_never_summed() -> None:
    """Redis state, queue length and spool bytes are gauges: a sum (with the final counts
    of exited workers in it) would be meaningless, so totals leave them out."""
    up = {"pid": 1, "slot": 0, "events_accepted": 2, "redis": "up", "queue_length": 5, "spool_bytes": 0}
    down = {"pid": 2, "slot": 1, "events_accepted": 1, "redis": "down", "queue_length": None, "spool_bytes": 9}
    assert metrics.total([up, down]) == {"events_accepted": 3}
    doc = metrics.stats_document([up, down], [], {"retired": {"events_accepted": 4}, "retired_pids": []})
    assert doc["total"] == {"events_accepted": 7} and doc["workers"][1]["spool_bytes"] == 9


def test_a_worker_that_does_not_answer_is_reported_missing(served: Meteorit) -> None:
    pids = served.worker_pids()
    frozen = pids[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        # a connection the kernel gives the frozen worker times out: try another
        text = wait_until(lambda: _get(served.port, "/metrics"), 30, "a scrape answered by the live worker")
        found = samples(text)
        assert total(found, "meteorit_workers") == 1
        assert total(found, "meteorit_workers_missing") == 1
        stats = json.loads(wait_until(lambda: _get(served.port, "/v1/stats"), 30, "stats"))
        assert stats["missing_workers"] == [frozen]
    finally:
        os.kill(frozen, signal.SIGCONT)


def _get(port: int, path: str) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()


def test_a_key_rate_holds_across_workers(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                                         redis_server: RedisServer) -> None:
    rate, burst, per_request = 200, 100, 20
    m = meteorit_factory({"redis": {"url": redis_server.url}, "auth": {"keys": ["k1", "k2"]},
                          "limits": {"key_rate": rate, "key_burst": burst}})
    accepted, limited, retry_after = [0], [0], set()
    lock = threading.Lock()
    stop = threading.Event()

    def blast() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
        body = json.dumps([{"type": "r"}] * per_request)
        while not stop.is_set():
            conn.request("POST", "/v1/events", body, {"Content-Type": "application/json", "X-Api-Key": "k1"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                if resp.status == 202:
                    accepted[0] += per_request
                else:
                    assert resp.status == 429, resp.status
                    limited[0] += 1
                    retry_after.add(resp.getheader("Retry-After"))
        conn.close()

    threads = [threading.Thread(target=blast) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3.0)  # the measured window itself, not a wait for readiness
    other = m.post({"type": "other"}, headers={"X-Api-Key": "k2"})[0]
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - start
    assert other == 202  # another key has its own budget
    assert limited[0] > 0 and retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
    # Each worker alone would admit the full rate: two would let about twice through.
    assert accepted[0] <= (rate * elapsed + burst) * 1.3, (accepted[0], elapsed)
    assert accepted[0] >= rate * elapsed * 0.5, (accepted[0], elapsed)
    served_by = [w for w in m.ctl_json("stats")["workers"] if w["requests"].get("202")]
    assert len(served_by) == 2  # both workers took part: the limit held across them
    assert redis.llen("meteorit:events") == accepted[0] + 1


def test_totals_do_not_go_back_when_workers_are_replaced(served: Meteorit) -> None:
    from test_control import rewrite
    for _ in range(10):
        assert served.post({"type": "a"})[0] == 202
    rewrite(served, redis={"timeout": 4.0})
    assert served.ctl_json("reload")["mode"] == "replace"

    def totals() -> tuple[float, float] | None:
        text = _get(served.port, "/metrics")
        if text is None:
            return None
        found = samples(text)
        per_worker = sum(v for (name, labels), v in found.items()
                         if name == "meteorit_events_accepted_total" and dict(labels).get("worker"))
        return total(found, "meteorit_events_accepted_total"), per_worker
    # the old workers' final counts reach the master as they exit
    assert wait_until(lambda: totals() == (10, 0), 20, "the total to keep the replaced workers' counts")
