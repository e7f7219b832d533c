"""What the consumer tells its operator: its counters, a live line on a terminal (or a
progress line in the log every `consumer.stats_interval` otherwise) and the summary
printed at exit.

Owns: the Counters the pipeline adds to, the lag (seconds behind the newest stored
event) and every line shown about them. Must not touch: Redis or the sink; the queue's
depth and the batches in hand come from the pipeline, through the callables it gives.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("meteorit.consumer")

LIVE_EVERY = 0.5  # seconds between refreshes of the terminal line


@dataclass
class Counters:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0  # rows new in the sink
    duplicates: int = 0  # rows the sink already had (a redelivered batch)
    dead: int = 0
    batches: int = 0
    newest_received_at: int = 0  # ms, of the newest stored event

    def as_log(self) -> dict[str, Any]:
        return {"stored": self.stored, "duplicates": self.duplicates, "dead_letters": self.dead,
                "batches": self.batches}


class Progress:
    """Reports `counters` while the pipeline runs. `depth` gives the queue's length (None
    while Redis cannot say), `in_hand` the batches popped and not yet acknowledged."""

    def __init__(self, counters: Counters, depth: Callable[[], Awaitable[int | None]],
                 in_hand: Callable[[], int], *, live: bool, every: float, sink_on_stdout: bool) -> None:
        self.counters = counters
        self.depth = depth
        self.in_hand = in_hand
        self.live = live
        self.every = LIVE_EVERY if live else every
        self.sink_on_stdout = sink_on_stdout  # ndjson:-: stdout carries the records

    async def run(self) -> None:
        """Report every `every` seconds until cancelled."""
        last_stored, last_time = 0, time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.every)
                now = time.monotonic()
                rate = (self.counters.stored - last_stored) / max(now - last_time, 1e-9)
                last_stored, last_time = self.counters.stored, now
                self.show(rate, await self.depth())
        finally:
            if self.live:  # what comes next (the logs of the stop) starts on a line of its own
                sys.stderr.write("\n")
                sys.stderr.flush()

    def lag(self, depth: int | None) -> float | None:
        """Seconds behind the newest stored event; 0 once caught up (nothing queued or in hand)."""
        if depth == 0 and not self.in_hand():
            return 0.0
        newest = self.counters.newest_received_at
        return max(0.0, time.time() - newest / 1000) if newest else None

    def show(self, rate: float, depth: int | None) -> None:
        c = self.counters
        lag = self.lag(depth)
        if self.live:
            line = (f"{rate:>10,.0f} events/s  queue {'?' if depth is None else f'{depth:,}'}  "
                    f"lag {'-' if lag is None else f'{lag:.1f}s'}  stored {c.stored:,}  "
                    f"dead {c.dead:,}  in hand {self.in_hand()}")
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
        else:
            log.info("progress", extra={**c.as_log(), "events_per_s": round(rate), "queue_depth": depth,
                                        "lag_s": None if lag is None else round(lag, 3)})

    def summary(self) -> None:
        """The consumer stopped: one line in the log, and one for the operator on stdout (on
        stderr when stdout carries the records)."""
        c = self.counters
        elapsed = time.monotonic() - c.started
        log.info("consumer stopped", extra={**c.as_log(), "seconds": round(elapsed, 3)})
        text = (f"meteorit-consumer: stored {c.stored} events in {c.batches} batches, "
                f"{c.duplicates} duplicates skipped, {c.dead} dead letters, {elapsed:.2f} s, "
                f"{c.stored / max(elapsed, 1e-9):,.0f} events/s\n")
        out = sys.stderr if self.sink_on_stdout else sys.stdout
        out.write(text)
        out.flush()
