"""A ledgered load generator for the fault tests and bin/meteorit-chaos.

`Load` posts batches of events with client-chosen ids (`<prefix><n>`) over keep-alive
HTTP/1.1 connections, from an asyncio loop in a thread of its own, one request in flight
per connection, and writes the fate of every id into a `Ledger`: sent without an answer,
acknowledged (202, from Redis or `"spooled": true`), or rejected (any other status).
`Ledger.audit` then reads the queue and counts the acknowledged ids found, missing (the
number that must be 0) and duplicated.

When Redis itself loses data (restarted empty), the events it held are its loss, not
meteorit's: the test pauses Redis's writes and calls `redis_crashed` just before it kills
Redis, which writes off exactly the events in the queue then. Every other acknowledged
event, above all the spooled ones not replayed yet, must reach the Redis that comes back. Events a test destroys on disk itself (a spool cut mid-record) are
marked with `destroy` and must NOT come back.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import orjson

UNSENT, SENT, ACKED, SPOOLED, REJECTED, DESTROYED = range(6)  # an event's fate in the ledger
RESPONSE_TIMEOUT = 30.0  # seconds a request may wait for its answer (a paused Redis, a drain)
RECONNECT_DELAY = 0.02
REJECTED_PAUSE = 0.02  # seconds a connection waits after a refusal before its next request
READ_CHUNK = 20_000  # queue records read per LRANGE


@dataclass
class Audit:
    sent: int
    acknowledged: int
    spooled: int  # of the acknowledged: answered from the spool
    rejected: int
    unanswered: int
    found: int  # acknowledged events found in the queue
    missing: int  # acknowledged events not in the queue: must be 0
    duplicated: int  # extra copies in the queue (at-least-once: allowed, should be few)
    lost_with_redis: int  # in the queue of a Redis that then restarted empty (not expected)
    destroyed: int  # acknowledged, then destroyed on disk by the test itself (not expected)
    destroyed_found: int  # of those, found in the queue anyway: must be 0 (no garbage replayed)
    missing_ids: list[str]

    def line(self) -> str:
        lost = f" ({self.lost_with_redis} were in the Redis that restarted empty)" if self.lost_with_redis else ""
        if self.destroyed:
            lost += f" ({self.destroyed} destroyed on disk by the test, {self.destroyed_found} of them found)"
        return ("sent {sent}, acknowledged {acknowledged} ({spooled} spooled), rejected {rejected}, "
                "unanswered {unanswered}, found in Redis {found}{lost}, missing {missing}, "
                "duplicated {duplicated}".format(lost=lost, **asdict(self)))


def report(name: str, audit: Audit, note: str = "", loss_allowed: bool = False) -> None:
    """Print a scenario's ledger, and append it to $METEORIT_CHAOS_REPORT for bin/meteorit-chaos.
    `loss_allowed`: a loss the README states as the risk of a setting (counted, not a failure)."""
    print(f"{name}: {audit.line()}" + (f"; {note}" if note else ""))
    path = os.environ.get("METEORIT_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": name, "note": note, "loss_allowed": loss_allowed, **asdict(audit)}) + "\n")


class Ledger:
    """The fate of every event id of one scenario."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.fate = bytearray()
        self.copies = bytearray()  # times each id was seen in the queue (saturating)
        self.lost = bytearray()  # 1: was in the queue of a Redis that lost its data
        self.read_upto = 0  # queue records already counted
        self.statuses: dict[int, int] = {}
        self.lock = threading.Lock()

    def take(self, count: int) -> int:
        """Numbers for `count` new events, marked sent."""
        with self.lock:
            first = len(self.fate)
            self.fate.extend(bytes((SENT,)) * count)
            self.copies.extend(bytes(count))
            self.lost.extend(bytes(count))
        return first

    def settle(self, first: int, count: int, status: int, spooled: bool) -> None:
        fate = (SPOOLED if spooled else ACKED) if status == 202 else REJECTED
        with self.lock:
            self.fate[first:first + count] = bytes((fate,)) * count
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def destroy(self, numbers: list[int]) -> None:
        """The test itself destroyed these acknowledged events on disk: not expected back."""
        with self.lock:
            for n in numbers:
                self.fate[n] = DESTROYED

    def count(self, *fates: int) -> int:
        return sum(self.fate.count(f) for f in fates)

    @property
    def acknowledged(self) -> int:
        return self.count(ACKED, SPOOLED)

    def redis_crashed(self, client: Any, queue: str) -> None:
        """Redis is about to lose its data, and its writes are paused (so nothing lands
        between this read and the crash): the events in its queue now are its loss. The
        queue starts over empty, and so does the count of copies."""
        numbers, _ = self._numbers(client, queue, 0)
        with self.lock:
            for n in numbers:
                self.lost[n] = 1
            self.copies = bytearray(len(self.copies))
            self.read_upto = 0

    def _numbers(self, client: Any, queue: str, start: int) -> tuple[list[int], int]:
        """The ledger numbers of the queue's records from `start` on (other records are
        skipped), and the index after the last record read."""
        prefix = self.prefix
        cut = len(prefix)
        numbers: list[int] = []
        while True:
            records = client.lrange(queue, start, start + READ_CHUNK - 1)
            if not records:
                return numbers, start
            start += len(records)
            for raw in records:
                event_id = orjson.loads(raw).get("id", "")
                if event_id.startswith(prefix):
                    numbers.append(int(event_id[cut:]))

    def read_queue(self, client: Any, queue: str) -> None:
        """Count the ids of the queue records not read yet (the queue only grows here)."""
        numbers, self.read_upto = self._numbers(client, queue, self.read_upto)
        copies = self.copies
        for n in numbers:
            if copies[n] < 255:
                copies[n] += 1

    def audit(self, client: Any, queue: str) -> Audit:
        self.read_queue(client, queue)
        return self.tally()

    def audit_ids(self, ids: Iterable[str]) -> Audit:
        """The ledger against every id found now, wherever they were read (the shards of a
        cluster, a sink's table): the count of copies starts over from these."""
        prefix = self.prefix
        cut = len(prefix)
        with self.lock:
            copies = self.copies = bytearray(len(self.fate))
            self.read_upto = 0
        for event_id in ids:
            if event_id.startswith(prefix) and copies[int(event_id[cut:])] < 255:
                copies[int(event_id[cut:])] += 1
        return self.tally()

    def tally(self) -> Audit:
        found = missing = duplicated = lost = destroyed_found = 0
        missing_ids: list[str] = []
        with self.lock:
            fate, copies, in_lost_redis = bytes(self.fate), bytes(self.copies), bytes(self.lost)
        for n, state in enumerate(fate):
            if copies[n] > 1:
                duplicated += copies[n] - 1
            if state == DESTROYED and copies[n]:
                destroyed_found += 1
            if state not in (ACKED, SPOOLED):
                continue
            if in_lost_redis[n] and not copies[n]:
                lost += 1
                continue
            if copies[n]:
                found += 1
            else:
                missing += 1
                if len(missing_ids) < 10:
                    missing_ids.append(f"{self.prefix}{n}")
        destroyed = fate.count(DESTROYED)  # acknowledged from the spool, before the test broke it
        return Audit(sent=len(fate) - fate.count(UNSENT),
                     acknowledged=fate.count(ACKED) + fate.count(SPOOLED) + destroyed,
                     spooled=fate.count(SPOOLED) + destroyed, rejected=fate.count(REJECTED),
                     unanswered=fate.count(SENT), found=found, missing=missing,
                     duplicated=duplicated, lost_with_redis=lost, destroyed=destroyed,
                     destroyed_found=destroyed_found, missing_ids=missing_ids)


class Load:
    """`connections` clients posting `batch` events per request until stopped."""

    def __init__(self, port: int, ledger: Ledger, connections: int = 8, batch: int = 10,
                 pad: int = 64) -> None:
        self.port = port
        self.ledger = ledger
        self.connections = connections
        self.batch = batch
        self.pad = b"x" * pad
        self.stopping = False
        self.errors = 0  # connections refused, reset or closed
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="ledgered-load", daemon=True)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=RESPONSE_TIMEOUT + 10)

    def wait_acknowledged(self, count: int, timeout: float) -> None:
        """Block until `count` events got a 202; AssertionError past `timeout`."""
        deadline = time.monotonic() + timeout
        while self.ledger.acknowledged < count:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError(f"only {self.ledger.acknowledged} of {count} events acknowledged "
                                     f"after {timeout}s (statuses {self.ledger.statuses})")
            time.sleep(0.05)

    def wait_status(self, status: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ledger.statuses.get(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {status} answer after {timeout}s (statuses {self.ledger.statuses})")
            time.sleep(0.05)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.connections)))

    async def _client(self) -> None:
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.errors += 1
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                while not self.stopping:
                    if not await self._exchange(reader, writer):
                        break
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                self.errors += 1  # the events in flight stay "sent": no answer, no promise
                await asyncio.sleep(RECONNECT_DELAY)
            finally:
                writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False when the server closes the connection after it."""
        ledger = self.ledger
        first = ledger.take(self.batch)
        body = b"[" + b",".join(b'{"type":"chaos","id":"%s%d","pad":"%s"}' % (
            ledger.prefix.encode(), n, self.pad) for n in range(first, first + self.batch)) + b"]"
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RESPONSE_TIMEOUT)
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        answer = await asyncio.wait_for(reader.readexactly(length), RESPONSE_TIMEOUT)
        ledger.settle(first, self.batch, status, b'"spooled":true' in answer)
        if status != 202:
            await asyncio.sleep(REJECTED_PAUSE)  # as a client honouring Retry-After would, a little
        return not close
