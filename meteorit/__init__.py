"""meteorit: real-time event ingestion into a Redis queue.

A package per program, and at the top what they share:
    master/    the supervisor process (arbiter, slots, reload, control, systemd, ...)
    worker/    one serving process (HTTP, routes, events, rate limits, writer, spool)
    bus/       the IPC bus between them (the ngx.ipc API and its wire format)
    consumer/  meteorit-consumer (batches, rows, one module per sink)
    config, record (the queue record: the contract between ingest and consumers),
    metrics, log, errors, privileges, and the entry points cli and ctl.

`from meteorit import ipc` is the bus's public API for plugins (meteorit.bus.ipc).
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the bus is imported on first use only: `meteorit -t` and meteoritctl need none of it
    if name == "ipc":
        from .bus import ipc
        return ipc
    raise AttributeError(f"module 'meteorit' has no attribute {name!r}")
