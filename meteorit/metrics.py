"""Counters: what one worker counts, and the sum over all workers as Prometheus text or JSON.

Owns: the counters of a worker (requests by status, events accepted and rejected, bytes in,
request durations, Redis batch sizes), their snapshot (a plain dict that crosses the IPC
bus and sits in the scoreboard as msgpack), the totals of workers that exited, and
rendering a set of snapshots for `/metrics`, `/v1/stats` and `meteoritctl stats`.
Must not touch: sockets, Redis, the bus or the scoreboard: the worker and the master
gather the snapshots; this module only counts, adds and formats.

Prometheus conventions: counters end in `_total`, units are in the names (`_seconds`,
`_bytes`), histograms are `_bucket` (with `le`), `_sum` and `_count`. Each worker's series
carry a `worker` label (its slot, a bounded set); what the workers that exited counted is
one more series per metric, `worker="exited"`; there is no unlabeled total beside them, so
`sum(metric)` is the service's total and counts nothing twice. The master's own counters
(restarts, reloads) have no `worker` label.

A snapshot also holds what a worker sees now (its Redis state, the queue length it last
saw, its spool's unreplayed bytes, the bytes of request bodies still arriving it holds:
OBSERVED), for `meteoritctl top` and `stats`; they are not summed (the totals of exited
workers would keep adding them) nor exported.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# Keys of a worker snapshot that are not counters: `total` leaves them out.
IDENTITY = ("pid", "slot", "version", "uptime_seconds")
# What a worker sees now (for meteoritctl top): per worker only, never summed nor exported.
OBSERVED = ("redis", "queue_length", "spool_bytes", "body_buffer_bytes", "redis_topology")

# Why an event request (POST /v1/events, the pixel) was refused, by status: a small fixed set,
# so a label, never free text.
REJECT_REASONS = {400: "invalid", 401: "unauthorized", 403: "forbidden", 413: "too_large",
                  415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable"}

Snapshot = dict[str, Any]


class Histogram:
    """Counts per bucket (not cumulative; the last one is above every bound), sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> Snapshot:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": self.count}


class WorkerCounters:
    def __init__(self) -> None:
        self.requests: Counter[int] = Counter()
        self.events_accepted = 0
        self.events_rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.duration = Histogram(LATENCY_BUCKETS)
        self.cors_refused = 0  # preflights and requests from an origin not in http.cors_origins
        self.pixel: Counter[str] = Counter()  # pixel requests: "accepted" or a reject reason

    def rejected(self, status: int, events: int) -> None:
        self.events_rejected[reject_reason(status)] += events


def reject_reason(status: int) -> str:
    return REJECT_REASONS.get(status, "other")


def worker_snapshot(counters: WorkerCounters, batch_sizes: Histogram, extra: Snapshot) -> Snapshot:
    """What one worker answers to a stats gather; `extra` holds pid, slot, version, writer figures."""
    return {**extra,
            "requests": {str(k): v for k, v in sorted(counters.requests.items())},
            "events_accepted": counters.events_accepted,
            "events_rejected": dict(sorted(counters.events_rejected.items())),
            "bytes_in": counters.bytes_in,
            "cors_refused": counters.cors_refused,
            "pixel_requests": dict(sorted(counters.pixel.items())),
            "request_duration_seconds": counters.duration.snapshot(),
            "batch_size": batch_sizes.snapshot()}


# --- sums

IDENTITY = ("pid", "slot", "version", "uptime_seconds")  # describe a worker; never summed
GAUGES = ("connections",)  # a worker's present state: part of a total only while it runs
EXITED = "exited"  # the `worker` label of what the workers that exited counted


def total(workers: list[Snapshot]) -> Snapshot:
    """The sum of worker snapshots: counters add up, histograms add bucket by bucket."""
    out: Snapshot = {}
    for snap in workers:
        for key, value in snap.items():
            if key in IDENTITY or key in OBSERVED:
                continue
            out[key] = _add(out.get(key), value)
    return out


def add_exited(exited: Snapshot, final: Snapshot) -> Snapshot:
    """The totals of exited workers with one more worker's last snapshot: its counters,
    not its gauges (an exited worker holds no connection)."""
    return total([exited, {k: v for k, v in final.items() if k not in GAUGES}])


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return _copy(b)
    if isinstance(b, dict) and "bounds" in b:
        return {"bounds": b["bounds"], "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
                "sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}
    if isinstance(b, dict):
        merged = dict(a)
        for k, v in b.items():
            merged[k] = _add(merged.get(k), v)
        return merged
    return a + b


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def stats_document(workers: list[Snapshot], missing: list[int], master: Snapshot | None,
                   last_known: list[Snapshot] | None = None) -> Snapshot:
    """The JSON of `/v1/stats` and `meteoritctl stats`.

    `workers` answered the gather; `last_known` are the scoreboard snapshots (at most a
    second old) of the `missing` ones that still run, so a slow worker does not take its
    counts out of the total; `master["retired"]` sums the workers that exited. A worker
    that answered and exited before the master replied is in the latter only."""
    retired = set(master.get("retired_pids", [])) if master else set()
    workers = sorted((w for w in workers if w.get("pid") not in retired), key=lambda w: w.get("slot", 0))
    stale = sorted(last_known or [], key=lambda w: w.get("slot", 0))
    exited = master.get("retired") or {} if master else {}
    return {"total": total(workers + stale + ([exited] if exited else [])), "workers": workers,
            "missing_workers": sorted(missing), "stale_workers": stale, "exited": exited,
            "master": master}


# --- Prometheus text format 0.0.4

COUNTERS = (  # (snapshot key, metric, help)
    ("events_accepted", "meteorit_events_accepted_total", "Events acknowledged with 202 (in Redis)."),
    ("bytes_in", "meteorit_request_body_bytes_total",
     "Request body bytes received on /v1/events (as sent: compressed ones before inflating)."),
    ("cors_refused", "meteorit_cors_refused_total",
     "Preflights refused, and requests answered without CORS headers, for an Origin not in http.cors_origins."),
    ("requests_abandoned", "meteorit_requests_abandoned_total",
     "Requests the client half-closed (FIN) before sending them whole: closed at once, not answered."),
    ("body_buffer_refused", "meteorit_body_buffer_refused_total",
     "Requests answered 503 because their body, still arriving, would pass limits.max_buffered_bytes."),
    ("redis_writes", "meteorit_redis_writes_total", "Group-commit RPUSH commands Redis acknowledged."),
    ("redis_write_errors", "meteorit_redis_write_errors_total", "RPUSH commands that failed."),
    ("events_spooled", "meteorit_events_spooled_total",
     "Events acknowledged from the spool because Redis could not take them in time."),
    ("events_replayed", "meteorit_events_replayed_total", "Spooled events pushed into Redis since."),
    ("redis_waits_short", "meteorit_redis_waits_short_total",
     "Group commits whose WAIT saw fewer than redis.wait_replicas replicas (their events spooled too)."),
)
HISTOGRAMS = (  # (snapshot key, metric, help)
    ("request_duration_seconds", "meteorit_request_duration_seconds",
     "From a request's headers and body in hand to its response."),
    ("batch_size", "meteorit_redis_batch_events", "Events per group-commit RPUSH."),
)


def prometheus(doc: Snapshot) -> str:
    """Prometheus text: each worker's series (`worker` = its slot; a worker that did not
    answer in time by its last known snapshot), `worker="exited"` for the workers gone."""
    lines: list[str] = []
    rows = [(str(w.get("slot", "")), w) for w in [*doc["workers"], *doc.get("stale_workers", [])]]
    if doc.get("exited"):
        rows.append((EXITED, doc["exited"]))

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    family("meteorit_requests_total", "counter", "HTTP requests answered, by status.")
    for worker, snap in rows:
        for status, n in snap.get("requests", {}).items():
            sample("meteorit_requests_total", {"status": status, "worker": worker}, n)
    family("meteorit_events_rejected_total", "counter",
           "Events in refused POST /v1/events and pixel requests, by reason (1 for a body that did not decode).")
    for worker, snap in rows:
        for reason, n in snap.get("events_rejected", {}).items():
            sample("meteorit_events_rejected_total", {"reason": reason, "worker": worker}, n)
    family("meteorit_pixel_requests_total", "counter",
           "GET /v1/pixel.gif requests by outcome: accepted, or why the event was refused (the GIF is sent anyway).")
    for worker, snap in rows:
        for outcome, n in snap.get("pixel_requests", {}).items():
            sample("meteorit_pixel_requests_total", {"outcome": outcome, "worker": worker}, n)
    for key, name, help_text in COUNTERS:
        family(name, "counter", help_text)
        for worker, snap in rows:
            sample(name, {"worker": worker}, snap.get(key, 0))
    for key, name, help_text in HISTOGRAMS:
        family(name, "histogram", help_text)
        for worker, snap in rows:
            if key in snap:
                _histogram(name, worker, snap[key], sample)
    _shards(doc, rows, family, sample)
    family("meteorit_workers", "gauge", "Workers that answered this scrape.")
    sample("meteorit_workers", {}, len(doc["workers"]))
    family("meteorit_workers_missing", "gauge",
           "Workers that did not answer this scrape in time (their series are their last known counts).")
    sample("meteorit_workers_missing", {}, len(doc["missing_workers"]))
    master = doc.get("master")
    family("meteorit_master_up", "gauge", "1 when the master answered this scrape.")
    sample("meteorit_master_up", {}, 0 if master is None else 1)
    if master is not None:
        for key, help_text in (("worker_restarts", "Workers respawned after they died."),
                               ("reloads", "Config reloads applied."),
                               ("reload_failures", "Config reloads refused or rolled back.")):
            family(f"meteorit_{key}_total", "counter", help_text)
            sample(f"meteorit_{key}_total", {}, master.get(key, 0))
    return "\n".join(lines) + "\n"


def _shards(doc: Snapshot, rows: list[tuple[str, Snapshot]], family: Any, sample: Any) -> None:
    """Cluster mode: writes and errors per shard, and whether each shard's primary answers
    (per live worker, as every series: `min by (shard)` tells whether all workers reach it)."""
    if not doc["total"].get("redis_shards"):
        return
    for key, name, help_text in (("writes", "meteorit_redis_shard_writes_total", "Group commits a shard took."),
                                 ("errors", "meteorit_redis_shard_write_errors_total",
                                  "Group commits a shard failed (they went to another shard or the spool).")):
        family(name, "counter", help_text)
        for worker, snap in rows:
            for shard, counts in sorted(snap.get("redis_shards", {}).items(), key=lambda kv: int(kv[0])):
                sample(name, {"shard": shard, "worker": worker}, counts[key])
    family("meteorit_redis_shard_reachable", "gauge", "1 while the shard's primary (the node label) answers.")
    for worker, snap in rows:
        if worker == EXITED:  # an exited worker reaches nothing now
            continue
        for node, entry in snap.get("redis_topology", {}).get("nodes", {}).items():
            for shard in entry["shards"]:
                sample("meteorit_redis_shard_reachable", {"shard": str(shard), "node": node, "worker": worker},
                       int(entry["reachable"]))


def _histogram(name: str, worker: str, hist: Snapshot, sample: Any) -> None:
    cumulative = 0
    for bound, count in zip([*hist["bounds"], float("inf")], hist["counts"]):
        cumulative += count
        sample(f"{name}_bucket", {"le": _number(bound), "worker": worker}, cumulative)
    sample(f"{name}_sum", {"worker": worker}, hist["sum"])
    sample(f"{name}_count", {"worker": worker}, hist["count"])


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(value)  # ints as 12, floats as 0.005 or 1.0: both are valid sample values


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
