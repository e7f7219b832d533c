"""The `meteorit` command line: start the master in the foreground, or check a config.

Owns: argument parsing, turning flags into config overrides, and exit codes.
Must not touch: anything the master does once it runs.

    meteorit [-c FILE] [--listen HOST:PORT]... [--workers N] [--redis URL]
    meteorit -t [-c FILE]       check the config; exit 1 naming the key and the reason
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, config, log, privileges
from .errors import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 1  # argparse exits 2 on bad arguments


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meteorit", description="Real-time event ingestion into Redis.")
    p.add_argument("-c", "--config", metavar="FILE", default=os.environ.get("METEORIT_CONFIG"),
                   help="TOML config file (default: $METEORIT_CONFIG, else built-in defaults)")
    p.add_argument("-t", "--test", action="store_true", help="check the config and exit")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="listen address, repeatable (overrides server.listen)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes, 0 = CPU count")
    p.add_argument("--redis", metavar="URL", help="Redis URL or \"embedded\" (overrides redis.url)")
    p.add_argument("--version", action="version", version=f"meteorit {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {"server.listen": args.listen, "server.workers": args.workers, "redis.url": args.redis}
    try:
        cfg = config.load(args.config, overrides=overrides)
        privileges.resolve(cfg.server.user, cfg.server.group)  # -t reports an unknown user too
    except ConfigError as exc:
        print(f"meteorit: config error: {exc.key}: {exc.reason}", file=sys.stderr)
        return EXIT_CONFIG
    if args.test:
        print(f"meteorit: config {args.config or '(defaults)'} is valid (version {cfg.version})")
        return EXIT_OK
    try:
        log.setup(cfg.log.level, cfg.log.format, cfg.log.file)
    except OSError as exc:
        print(f"meteorit: cannot open log.file {cfg.log.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    from .master.arbiter import Master  # imported late: `-t` needs none of the runtime
    return Master(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
