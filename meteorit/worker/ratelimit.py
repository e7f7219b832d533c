"""Per-API-key rate limits, enforced across all workers.

Owns: one token bucket per key in each worker, and the share of each key's rate that this
worker holds. Must not touch: the bus (the worker sends and receives the demand reports),
HTTP or Redis.

The scheme: a key's rate (events/s) is split between the workers. Every REBALANCE seconds
each worker broadcasts how many events each key asked of it (admitted or not) since its
last report; every worker then gives itself the part of the rate that matches its part of
the demand, above a floor (FLOOR of an even share) so a worker that sees a key for the
first time can serve it at once. Shares add up to the rate, so the service as a whole
admits at most rate x seconds + burst events per key, whichever worker the kernel hands
each connection to; what goes over for one interval after demand moves is bounded by the
floor. A bucket may go into debt: a request is admitted whole while the bucket holds at
least its size, or is full (so a batch bigger than the burst is not refused forever).
"""

from __future__ import annotations

import math
from typing import Mapping

REBALANCE = 0.25  # seconds between demand reports
FLOOR = 0.2  # part of an even share every worker keeps for every key


class Bucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        """0.0 if `n` events may pass (and are taken), else the seconds until they could."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n or self.tokens >= self.capacity:
            self.tokens -= n
            return 0.0
        return (min(n, self.capacity) - self.tokens) / self.rate

    def resize(self, rate: float, capacity: float, now: float) -> None:
        self.take(0, now)  # settle what the old rate earned
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


class KeyRates:
    def __init__(self, rate: int, burst: int, keys: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst or rate)
        self.keys = keys
        self.workers = 1
        self.buckets = [Bucket(self.rate, self.burst, now) for _ in range(keys)]
        self.demand = [0] * keys  # events asked since the last report, admitted or not
        self.reports: dict[int, dict[int, int]] = {}  # pid -> {key: demand} of the last round

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.keys > 0

    def admit(self, key: int, n: int, now: float) -> float:
        """0.0 when `n` events of key number `key` may pass, else seconds to wait."""
        self.demand[key] += n
        return self.buckets[key].take(n, now)

    def take_report(self) -> dict[int, int]:
        """This worker's demand since the last report (to broadcast), and start anew."""
        report = {k: n for k, n in enumerate(self.demand) if n}
        self.demand = [0] * self.keys
        return report

    def record(self, pid: int, report: Mapping[int, int]) -> None:
        self.reports[pid] = {int(k): int(v) for k, v in report.items()}

    def rebalance(self, me: int, live: list[int], now: float) -> None:
        """Give this worker (`me`) its share of each key, from the reports of the `live` pids."""
        self.reports = {pid: r for pid, r in self.reports.items() if pid in live}
        n = max(1, len(live))
        self.workers = n
        floor = FLOOR / n
        for key, bucket in enumerate(self.buckets):
            total = sum(r.get(key, 0) for r in self.reports.values())
            mine = self.reports.get(me, {}).get(key, 0)
            part = 1 / n if total == 0 else floor + (1 - FLOOR) * mine / total
            bucket.resize(self.rate * part, max(1.0, self.burst * part), now)


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header: at least 1."""
    return max(1, math.ceil(seconds))
