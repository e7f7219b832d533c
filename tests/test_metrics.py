"""Counters across workers: /metrics and /v1/stats sum what every worker counted, a worker
that does not answer is reported missing (its last known counts stay), a worker killed
with SIGKILL keeps its counts in the totals, the Prometheus text follows Prometheus's
conventions (read with prometheus_client's own parser), and per-key rate limits hold
across workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until
from meteorit import metrics
from exposition import Samples, by_worker, samples, total

pytestmark = pytest.mark.slow

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
    assert total(found, "meteorit_redis_batch_events_count") == total(found, "meteorit_redis_writes_total") >= 1
    assert total(found, "meteorit_workers") == 2 and total(found, "meteorit_workers_missing") == 0
    assert total(found, "meteorit_master_up") == 1
    assert total(found, "meteorit_events_spooled_total") == 0  # Redis took everything
    assert total(found, "meteorit_worker_restarts_total") == 0
    # one series per worker and none beside them: sum() counts every event once
    assert by_worker(found, "meteorit_events_accepted_total").keys() == {"0", "1"}
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
    """...and its counts stay in the totals: its series are its last known counts, from
    the scoreboard, so a slow worker does not make the totals go back."""
    accepted = post_until_both_workers_served(served)
    pids = served.worker_pids()
    frozen = pids[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        # a connection the kernel gives the frozen worker times out: scrape_until tries another
        found = scrape_until(served, lambda found: total(found, "meteorit_workers_missing"))
        assert total(found, "meteorit_workers") == 1
        assert total(found, "meteorit_workers_missing") == 1
        assert by_worker(found, "meteorit_events_accepted_total") == accepted
        stats = json.loads(wait_until(lambda: _get(served.port, "/v1/stats"), 30, "stats"))
        assert stats["missing_workers"] == [frozen]
        assert [w["pid"] for w in stats["stale_workers"]] == [frozen]
        assert stats["total"]["events_accepted"] == sum(accepted.values())
    finally:
        os.kill(frozen, signal.SIGCONT)


def post_until_both_workers_served(m: Meteorit) -> dict[str, float]:
    """Single events on new connections until each worker accepted some (the kernel picks
    the worker of each connection); returns the per-worker counts a scrape then shows."""
    posted = [0]

    def both_served() -> bool:
        assert m.post({"type": "spread"})[0] == 202
        posted[0] += 1
        counts = by_worker(samples(m.request("GET", "/metrics")[2].decode()), "meteorit_events_accepted_total")
        return len(counts) == 2 and all(counts.values())
    wait_until(both_served, 30, "both workers to accept events")
    return by_worker(scrape_until(m, lambda found: total(found, "meteorit_events_accepted_total") == posted[0]),
                     "meteorit_events_accepted_total")


def scrape_until(m: Meteorit, check: Callable[[Samples], Any]) -> Samples:
    """The first scrape that passes `check` (a scrape within 0.5 s of another is answered
    from that one's cache: this waits for a fresh one)."""
    def scraped() -> Samples | None:
        text = _get(m.port, "/metrics")
        found = samples(text) if text is not None else None
        return found if found is not None and check(found) else None
    return wait_until(scraped, 30, "a scrape that passes the check")


def test_totals_keep_what_workers_killed_with_sigkill_counted(served: Meteorit, redis: redislib.Redis) -> None:
    """kill -9 sends no final report: the master reads each dead worker's last snapshot
    from the scoreboard, once, so the totals after the respawn hold every event."""
    accepted = post_until_both_workers_served(served)
    for _ in range(5):
        assert served.post([{"type": "batch"}] * 10)[0] == 202
    n = redis.llen("meteorit:events")
    assert n == sum(accepted.values()) + 50
    # a scrape that gathered every count: each worker wrote its board as it answered
    scraped = scrape_until(served, lambda found: total(found, "meteorit_events_accepted_total") == n)
    old = served.worker_pids()
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(served.logs("worker serving")) >= 4, 30, "both workers respawned and serving")
    found = scrape_until(served, lambda found: total(found, "meteorit_workers") == 2)
    assert total(found, "meteorit_events_accepted_total") == n  # >= n: nothing lost; == n: counted once
    assert by_worker(found, "meteorit_events_accepted_total") == {"0": 0, "1": 0, "exited": n}
    assert total(found, "meteorit_requests_total", status="202", worker="exited") == \
        total(scraped, "meteorit_requests_total", status="202")
    assert total(found, "meteorit_worker_restarts_total") == 2
    stats = served.ctl_json("stats")
    assert stats["total"]["events_accepted"] == n and stats["exited"]["events_accepted"] == n
    assert "connections" not in stats["exited"]  # a gauge of a live worker, not summed for the dead


def test_a_killed_worker_keeps_what_it_counted_up_to_its_last_second(served: Meteorit,
                                                                     redis: redislib.Redis) -> None:
    """No scrape before the kill: the counts reach the scoreboard on the worker's
    once-a-second tick."""
    for _ in range(10):
        assert served.post({"type": "unscraped"})[0] == 202
    time.sleep(2.5)  # the contract itself: counts older than a second survive a SIGKILL
    for pid in served.worker_pids().values():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(served.logs("worker serving")) >= 4, 30, "both workers respawned and serving")
    found = scrape_until(served, lambda found: total(found, "meteorit_workers") == 2)
    assert by_worker(found, "meteorit_events_accepted_total") == {"0": 0, "1": 0, "exited": 10}
    assert redis.llen("meteorit:events") == 10


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
        accepted = by_worker(samples(text), "meteorit_events_accepted_total")
        return accepted.pop("exited", 0), sum(accepted.values())
    # the old workers' last counts, written to the scoreboard as they exit, go to `exited`
    assert wait_until(lambda: totals() == (10, 0), 20, "the total to keep the replaced workers' counts")
