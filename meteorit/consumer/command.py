"""`meteorit-consumer`: drains the Redis queue into a database in atomic batches.

    meteorit-consumer [-c FILE] [--sink URL] [--batch N] [--concurrency N] [--once]
                      [--redis URL] [--name NAME] [--shards 0-3,8]

Owns: the command line, the config it loads, the consumer's process (its id, logging,
signal handlers, interpreter settings) and opening the sink `consumer.sink` names. Must
not touch: the pipeline's work (consumer.pipeline), Redis or the databases.

Exit codes: 0 done (or stopped by TERM/INT with every batch in hand stored), 1 a config
error or batches left unstored at exit (see consumer.pipeline), 2 bad arguments (argparse, --shards).
A TERM or INT that comes during start-up, before the event loop runs, is a stop like any
other, not a kill.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from typing import Any

from .. import __version__, config, values
from .. import log as logsetup
from ..errors import ConfigError
from .ndjson import NdjsonSink
from .pipeline import EXIT_FAILED, Consumer
from .postgresql import PostgresSink
from .shards import parse_shard_list
from .sink import Sink
from .sqlite import SqliteSink

EXIT_USAGE = 2  # as argparse: a bad --shards
STALL_SHARE = 2 / 3  # of consumer.lease: a database statement taking longer is stuck
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Signals that came before the event loop could take them (see main).
_early_signals: list[str] = []


def record_early_signal(signum: int, frame: Any) -> None:
    _early_signals.append(signal.Signals(signum).name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meteorit-consumer",
                                description="Drain meteorit's Redis queue into SQLite, PostgreSQL or NDJSON.")
    p.add_argument("-c", "--config", metavar="FILE", default=os.environ.get("METEORIT_CONFIG"),
                   help="TOML config file (default: $METEORIT_CONFIG, else built-in defaults)")
    p.add_argument("--sink", metavar="URL", help="sqlite:///PATH, postgresql://..., ndjson:PATH or ndjson:- "
                   "(overrides consumer.sink)")
    p.add_argument("--batch", type=int, metavar="N", help="records per batch (overrides consumer.batch)")
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="batches in hand at once (overrides consumer.concurrency)")
    p.add_argument("--once", action="store_true", help="drain what is there, print a summary and exit")
    p.add_argument("--redis", metavar="URL", help="Redis URL or \"embedded\" (overrides redis.url)")
    p.add_argument("--name", help="consumer name (overrides consumer.name)")
    p.add_argument("--shards", metavar="LIST", help="cluster mode: only these shards, e.g. 0-3,8 (default: "
                   "every shard, shared with the other consumers by lease)")
    p.add_argument("--version", action="version", version=f"meteorit-consumer {__version__}")
    return p


def consumer_id(name: str) -> str:
    return f"{name or socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def open_sink(url: str, table: str, writers: int, stall: float) -> Sink:
    """The sink `consumer.sink` names (checked already by config). `stall`: seconds a
    database statement may take before it counts as stuck."""
    spec = values.parse_sink_url(url)
    if spec.kind == "sqlite":
        return SqliteSink(spec.target, table, spec.timeout)
    if spec.kind == "postgresql":
        return PostgresSink(spec.target, table, writers, stall)
    return NdjsonSink(spec.target)


async def serve(consumer: Consumer) -> int:
    """Run `consumer` with TERM and INT routed to its stop, those that came before the event
    loop included; its exit code."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, consumer.handle_stop, sig.name)
    for name in _early_signals:
        consumer.handle_stop(name)
    return await consumer.run()


def main(argv: list[str] | None = None) -> int:
    # First: a TERM during start-up is a stop like any other (exit 0), not a kill. The
    # handler only records it; serve() acts on it once the event loop runs.
    for sig in STOP_SIGNALS:
        signal.signal(sig, record_early_signal)
    args = parser().parse_args(argv)
    overrides = {"consumer.sink": args.sink, "consumer.batch": args.batch,
                 "consumer.concurrency": args.concurrency, "redis.url": args.redis, "consumer.name": args.name}
    try:
        cfg = config.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"meteorit-consumer: config error: {exc.key}: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    shards = None
    if args.shards is not None:
        try:
            if cfg.redis.mode != config.CLUSTER:
                raise ValueError("only in cluster mode (redis.mode = \"cluster\")")
            shards = parse_shard_list(args.shards, cfg.redis.shards)
        except ValueError as exc:
            print(f"meteorit-consumer: --shards: {exc}", file=sys.stderr)
            return EXIT_USAGE
    ident = consumer_id(cfg.consumer.name)
    logsetup.setup(cfg.log.level, cfg.log.format)
    logsetup.set_role("consumer", consumer=ident)
    sink = open_sink(cfg.consumer.sink, cfg.consumer.table, cfg.consumer.concurrency,
                     stall=cfg.consumer.lease * STALL_SHARE)
    # The sink's writer thread runs with the GIL released while SQLite inserts a batch,
    # then needs it back: a short switch interval keeps it from waiting 5 ms on the
    # decoding thread each time.
    sys.setswitchinterval(0.0005)
    gc.freeze()  # what exists now lives as long as the process: keep it out of collections
    consumer = Consumer(cfg, sink, ident, once=args.once, live=sys.stderr.isatty(), shards=shards)
    return asyncio.run(serve(consumer))


if __name__ == "__main__":
    sys.exit(main())
