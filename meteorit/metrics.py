"""Counters: what one worker counts, and the sum over all workers as Prometheus text or JSON.

Owns: the counters of a worker (requests by status, events accepted and rejected, bytes in,
request durations, Redis batch sizes), their snapshot (a plain dict that crosses the IPC
bus as msgpack), and rendering a set of snapshots for `/metrics`, `/v1/stats` and
`meteoritctl stats`.
Must not touch: sockets, Redis or the bus: app.py gathers the snapshots; this module only
counts and formats.

Prometheus naming: counters end in `_total`, durations are in seconds. Every series comes
once per worker with a `worker` label (the worker's slot, a bounded set) and once without
it, the service's total: the workers that answered plus the final counts of the workers
that exited (the master keeps those), so a total does not go back when a worker is
replaced. Select `{worker=""}` for the whole service.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# Why a POST /v1/events was refused, by status: a small fixed set, so a label, never free text.
REJECT_REASONS = {400: "invalid", 401: "unauthorized", 413: "too_large", 415: "unsupported_media_type",
                  429: "rate_limited", 503: "unavailable"}

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

    def rejected(self, status: int, events: int) -> None:
        self.events_rejected[REJECT_REASONS.get(status, "other")] += events


def worker_snapshot(counters: WorkerCounters, batch_sizes: Histogram, extra: Snapshot) -> Snapshot:
    """What one worker answers to a stats gather; `extra` holds pid, slot, version, writer figures."""
    return {**extra,
            "requests": {str(k): v for k, v in sorted(counters.requests.items())},
            "events_accepted": counters.events_accepted,
            "events_rejected": dict(sorted(counters.events_rejected.items())),
            "bytes_in": counters.bytes_in,
            "request_duration_seconds": counters.duration.snapshot(),
            "batch_size": batch_sizes.snapshot()}


# --- sums


def total(workers: list[Snapshot]) -> Snapshot:
    """The sum of worker snapshots: counters add up, histograms add bucket by bucket."""
    out: Snapshot = {}
    for snap in workers:
        for key, value in snap.items():
            if key in ("pid", "slot", "version", "uptime_seconds", "redis_topology"):
                continue
            out[key] = _add(out.get(key), value)
    return out


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


def stats_document(workers: list[Snapshot], missing: list[int], master: Snapshot | None) -> Snapshot:
    """The JSON of `/v1/stats` and `meteoritctl stats`."""
    retired = set(master.get("retired_pids", [])) if master else set()
    workers = sorted((w for w in workers if w.get("pid") not in retired), key=lambda w: w.get("slot", 0))
    gone = [master["retired"]] if master and master.get("retired") else []
    return {"total": total(workers + gone), "workers": workers, "missing_workers": sorted(missing),
            "master": master}


# --- Prometheus text format 0.0.4

COUNTERS = (  # (snapshot key, metric, help)
    ("events_accepted", "meteorit_events_accepted_total", "Events acknowledged with 202 (in Redis)."),
    ("bytes_in", "meteorit_request_body_bytes_total", "Request body bytes received on /v1/events."),
    ("redis_writes", "meteorit_redis_writes_total", "Group-commit RPUSH commands Redis acknowledged."),
    ("redis_write_errors", "meteorit_redis_write_errors_total", "RPUSH commands that failed."),
    ("events_spooled", "meteorit_events_spooled_total",
     "Events acknowledged from the spool because Redis could not take them in time."),
    ("events_replayed", "meteorit_events_replayed_total", "Spooled events pushed into Redis since."),
    ("redis_waits_short", "meteorit_redis_waits_short_total",
     "Group commits whose WAIT saw fewer than redis.wait_replicas replicas (their events spooled too)."),
)


def prometheus(doc: Snapshot) -> str:
    lines: list[str] = []
    rows = [("", doc["total"])] + [(str(w.get("slot", "")), w) for w in doc["workers"]]

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v != "")
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    family("meteorit_requests_total", "counter", "HTTP requests answered, by status.")
    for worker, snap in rows:
        for status, n in snap.get("requests", {}).items():
            sample("meteorit_requests_total", {"status": status, "worker": worker}, n)
    family("meteorit_events_rejected_total", "counter",
           "Events in refused POST /v1/events requests, by reason (1 for a body that did not decode).")
    for worker, snap in rows:
        for reason, n in snap.get("events_rejected", {}).items():
            sample("meteorit_events_rejected_total", {"reason": reason, "worker": worker}, n)
    for key, name, help_text in COUNTERS:
        family(name, "counter", help_text)
        for worker, snap in rows:
            sample(name, {"worker": worker}, snap.get(key, 0))
    for key, name, help_text in (
            ("request_duration_seconds", "meteorit_request_duration_seconds",
             "From a request's headers and body in hand to its response."),
            ("batch_size", "meteorit_redis_batch_size", "Events per group-commit RPUSH.")):
        family(name, "histogram", help_text)
        for worker, snap in rows:
            if key in snap:
                _histogram(name, worker, snap[key], sample)
    _shards(doc, rows, family, sample)
    family("meteorit_workers", "gauge", "Workers that answered this scrape.")
    sample("meteorit_workers", {}, len(doc["workers"]))
    family("meteorit_workers_missing", "gauge", "Workers that did not answer this scrape in time.")
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
    (per worker, and without the label: 1 when every worker that answered reaches it)."""
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
    seen: dict[tuple[str, str], int] = {}
    for worker, snap in rows[1:]:
        for node, entry in snap.get("redis_topology", {}).get("nodes", {}).items():
            for shard in entry["shards"]:
                up = int(entry["reachable"])
                sample("meteorit_redis_shard_reachable", {"shard": str(shard), "node": node, "worker": worker}, up)
                seen[(str(shard), node)] = min(seen.get((str(shard), node), 1), up)
    for (shard, node), up in sorted(seen.items(), key=lambda kv: int(kv[0][0])):
        sample("meteorit_redis_shard_reachable", {"shard": shard, "node": node}, up)


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
