"""The Prometheus text and the stats document made from worker snapshots, without
processes: one series per worker and per metric, `worker="exited"` for the workers gone,
no unlabeled total beside them (so sum() counts each event once), and the naming rules,
checked with prometheus_client's own parser (exposition.py)."""

from __future__ import annotations

from typing import Any

from exposition import by_worker, samples, total
from meteorit import metrics
from meteorit.metrics import BATCH_BUCKETS, Histogram, WorkerCounters, worker_snapshot


def snapshot(slot: int, accepted: int, durations: list[float], connections: int = 0) -> dict[str, Any]:
    counters = WorkerCounters()
    counters.events_accepted = accepted
    counters.requests[202] = len(durations)
    counters.events_rejected["invalid"] = slot
    for d in durations:
        counters.duration.observe(d)
    batches = Histogram(BATCH_BUCKETS)
    batches.observe(accepted)
    return worker_snapshot(counters, batches, {"pid": 100 + slot, "slot": slot, "version": "v",
                                               "uptime_seconds": 1.0, "connections": connections,
                                               "redis_writes": 1, "redis_write_errors": 0,
                                               "events_spooled": 0, "events_replayed": 0})


def master(retired: dict[str, Any], retired_pids: list[int]) -> dict[str, Any]:
    return {"pid": 1, "worker_restarts": 3, "reloads": 1, "reload_failures": 0,
            "retired": retired, "retired_pids": retired_pids}


def test_each_worker_once_and_the_exited_ones_under_their_own_label() -> None:
    exited = metrics.add_exited(metrics.add_exited({}, snapshot(0, 40, [0.2], connections=9)),
                                snapshot(1, 2, [0.001]))
    doc = metrics.stats_document([snapshot(0, 5, [0.01, 0.02]), snapshot(1, 7, [3.0])], [], master(exited, [7]))
    found = samples(metrics.prometheus(doc))
    assert by_worker(found, "meteorit_events_accepted_total") == {"0": 5, "1": 7, "exited": 42}
    assert total(found, "meteorit_events_accepted_total") == 54 == doc["total"]["events_accepted"]
    assert total(found, "meteorit_requests_total", status="202") == 5
    assert total(found, "meteorit_request_duration_seconds_count") == 5
    assert total(found, "meteorit_request_duration_seconds_bucket", le="+Inf") == 5
    assert total(found, "meteorit_request_duration_seconds_bucket", le="0.025", worker="0") == 2
    assert total(found, "meteorit_redis_batch_events_count", worker="exited") == 2
    assert total(found, "meteorit_events_rejected_total", reason="invalid") == 1 + 1
    assert total(found, "meteorit_worker_restarts_total") == 3 and total(found, "meteorit_master_up") == 1
    assert "connections" not in doc["exited"]  # the dead hold no connection


def test_a_worker_that_answered_then_exited_counts_once() -> None:
    """Its reply of the gather and its last snapshot in the exited totals: the latter only."""
    gone = snapshot(1, 7, [0.1])
    doc = metrics.stats_document([snapshot(0, 5, [0.1]), gone], [], master(metrics.add_exited({}, gone), [101]))
    assert [w["slot"] for w in doc["workers"]] == [0]
    assert by_worker(samples(metrics.prometheus(doc)), "meteorit_events_accepted_total") == {"0": 5, "exited": 7}


def test_a_worker_that_did_not_answer_is_shown_by_its_last_known_counts() -> None:
    doc = metrics.stats_document([snapshot(0, 5, [0.1])], [101], master({}, []), [snapshot(1, 7, [0.1])])
    found = samples(metrics.prometheus(doc))
    assert by_worker(found, "meteorit_events_accepted_total") == {"0": 5, "1": 7}
    assert total(found, "meteorit_workers") == 1 and total(found, "meteorit_workers_missing") == 1
    assert doc["total"]["events_accepted"] == 12 and doc["missing_workers"] == [101]


def test_without_the_master_the_workers_still_add_up() -> None:
    doc = metrics.stats_document([snapshot(0, 5, [0.1])], [], None)
    found = samples(metrics.prometheus(doc))
    assert total(found, "meteorit_master_up") == 0 and total(found, "meteorit_events_accepted_total") == 5
