"""`meteoritctl`: drive a running meteorit through its control socket.

Owns: the client side of the control protocol (see master/control.py), argument parsing,
human and `--json` output, and LSB exit codes: 0 ok, 1 error, 2 bad arguments, 3 not
running. `top` lives in ctltop.py.
Must not touch: anything but the socket: it never signals or reads the master's files.

    meteoritctl [-s SOCKET | -c CONFIG] [--json] [--timeout SECONDS] COMMAND   (-s wins over -c)
      status | workers | stats | reload | scale N | stop [--graceful]
      top [-d SECONDS] [-n N]
      broadcast NAME [DATA] [--wait SECONDS]
      send PID NAME [DATA] [--wait SECONDS]
Options go before or after the command, in any order (the last one given wins); `--` ends
the options, so `broadcast NAME -- --DATA` sends a DATA that starts with a dash. DATA is
text, `@FILE` (the file's bytes) or `-` (standard input), so alerts larger than a command
line work.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import socket
import sys
import tomllib
from typing import Any

import msgpack

from . import config as configlib
from .master.control import LENGTH, MAX_FRAME
from .errors import ConfigError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

DEFAULT_TIMEOUT = 15.0  # seconds for commands that do not wait on workers
LONG_TIMEOUT = 900.0  # reload and scale replace workers one by one


class NotRunning(Exception):
    pass


# Why a scanner before argparse: argparse cannot take options after a subcommand's
# positionals and then more positionals (`send PID NAME --wait 2 DATA`), nor the parent's
# options after the subcommand, and Python 3.11's argparse drops an argument that is
# literally `--`. So `arguments` moves every option ahead of the positionals itself, and
# hands argparse `COMMAND OPTIONS -- POSITIONALS`: the same grammar, in one order it parses.

Arities = dict[str, bool]  # option string -> takes a value


class Grammar:
    """The parser, and what the scanner must know of it: each option's arity (global ones
    and each command's) and each command's positionals in order."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="meteoritctl", description="Control a running meteorit.",
            epilog="Options go before or after the command. `--` ends the options: every word "
                   "after it is an argument, even one that starts with a dash.")
        self.common = argparse.ArgumentParser(add_help=False)  # the global options, repeated in each command
        self.global_arities: Arities = {}
        self.arities: dict[str, Arities] = {}
        self.positionals: dict[str, list[tuple[str, Any]]] = {}
        for target, suppress in ((self.parser, False), (self.common, True)):
            # in a command, a global option left out must not reset the one given before it
            def default(value: Any, suppress: bool = suppress) -> Any:
                return argparse.SUPPRESS if suppress else value
            self._option(target, None, "-s", "--socket", default=default(None),
                         help="the control socket (default: from the config)")
            self._option(target, None, "-c", "--config", default=default(os.environ.get("METEORIT_CONFIG")),
                         help="the config file whose [control] socket to use (default: $METEORIT_CONFIG)")
            self._option(target, None, "--json", action="store_true", default=default(False),
                         help="print the reply as JSON")
            self._option(target, None, "--timeout", type=float, metavar="SECONDS", default=default(None),
                         help="give up waiting for the reply")
        self.sub = self.parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def _option(self, target: argparse.ArgumentParser, command: str | None, *flags: str, **kw: Any) -> None:
        action = target.add_argument(*flags, **kw)
        table = self.global_arities if command is None else self.arities[command]
        table.update(dict.fromkeys(action.option_strings, action.nargs != 0))

    def command(self, name: str, help: str) -> argparse.ArgumentParser:
        self.arities[name] = {"-h": False, "--help": False}
        self.positionals[name] = []
        return self.sub.add_parser(name, help=help, parents=[self.common])

    def option(self, command: str, *flags: str, **kw: Any) -> None:
        self._option(self.sub.choices[command], command, *flags, **kw)

    def positional(self, command: str, dest: str, convert: Any = str, **kw: Any) -> None:
        self.sub.choices[command].add_argument(dest, type=convert, **kw)
        self.positionals[command].append((dest, convert))

    def parse(self, argv: list[str]) -> argparse.Namespace:
        command, options, positionals = self.scan(argv)
        if command is None:  # no command: argparse says so (or prints the help)
            return self.parser.parse_args(argv)
        extra = positionals[len(self.positionals[command]):]
        if extra:  # argparse would name the `--` we add too
            self.sub.choices[command].error(f"unrecognized arguments: {' '.join(extra)}")
        args = self.parser.parse_args([command, *options, *(["--", *positionals] if positionals else [])])
        for (dest, convert), raw in zip(self.positionals[command], positionals):
            if raw == "--":  # what Python 3.11's argparse drops
                setattr(args, dest, convert(raw))
        return args

    def scan(self, argv: list[str]) -> tuple[str | None, list[str], list[str]]:
        """Split argv into the command, the options (with their values, in order) and the
        positionals after the command."""
        command: str | None = None
        options: list[str] = []
        positionals: list[str] = []
        i = 0
        while i < len(argv):
            word = argv[i]
            i += 1
            if word == "--":
                positionals.extend(argv[i:])
                break
            if _is_option(word):
                options.append(word)
                if self._takes_value(word, command) and i < len(argv):
                    options.append(argv[i])
                    i += 1
            elif command is None and word in self.sub.choices:
                command = word
            elif command is None:  # an unknown command: argparse names it
                return None, [], []
            else:
                positionals.append(word)
        return command, options, positionals

    def _takes_value(self, word: str, command: str | None) -> bool:
        """Whether the option `word` takes the next word as its value (not when it holds it:
        `--wait=2`, `-s/path`; an unknown option takes none, and argparse reports it)."""
        known = {**self.global_arities, **(self.arities.get(command, {}) if command else {})}
        if word.startswith("--"):
            if "=" in word:
                return False
            matches = [flag for flag in known if flag.startswith(word)]  # argparse's abbreviations
            return known[word] if word in known else len(matches) == 1 and known[matches[0]]
        return len(word) == 2 and known.get(word, False)


def _is_option(word: str) -> bool:
    """As argparse sees it: `-` alone (standard input) and negative numbers are not options."""
    return word.startswith("-") and word != "-" and not _NEGATIVE_NUMBER.match(word)


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def grammar() -> Grammar:
    g = Grammar()
    g.command("status", "master and workers: pids, uptime, version, requests, restarts")
    g.command("workers", "the workers the master runs")
    g.command("stats", "every worker's counters and their sum")
    g.command("top", "a live view of workers, rates, statuses, Redis and spools; q quits")
    g.option("top", "-d", "--delay", type=float, default=1.0, metavar="SECONDS",
             help="between two refreshes (default: 1)")
    g.option("top", "-n", "--iterations", type=int, metavar="N",
             help="print N frames as plain text and exit (no terminal needed)")
    g.command("reload", "re-read the config and apply it without dropping a request")
    for name, what, reply in (("broadcast", "send an alert to every worker", "print the replies"),
                              ("send", "send an alert to one process", "print the reply")):
        g.command(name, what)
        if name == "send":
            g.positional(name, "pid", int)
        g.positional(name, "name")
        g.positional(name, "data", nargs="?", default="", help="text, @FILE or - for stdin")
        g.option(name, "--wait", type=float, default=0.0, metavar="SECONDS", help=reply)
    g.command("scale", "run N workers (started, or stopped gracefully)")
    g.positional("scale", "workers", int)
    g.command("stop", "stop meteorit (fast, or --graceful)")
    g.option("stop", "--graceful", action="store_true", help="finish in-flight requests first")
    return g


def main(argv: list[str] | None = None) -> int:
    args = grammar().parse(sys.argv[1:] if argv is None else argv)
    if args.command == "top":
        from . import ctltop
        return ctltop.main(args)
    try:
        path = socket_path(args)
        request = build_request(args)
    except (ConfigError, OSError) as exc:
        message = f"{exc.key}: {exc.reason}" if isinstance(exc, ConfigError) else str(exc)
        print(f"meteoritctl: {message}", file=sys.stderr)
        return EXIT_ERROR
    timeout = args.timeout if args.timeout is not None else (LONG_TIMEOUT if args.command in ("reload", "scale")
                               else DEFAULT_TIMEOUT + getattr(args, "wait", 0.0))
    try:
        reply = call(path, request, timeout)
    except NotRunning as exc:
        print(f"meteoritctl: meteorit is not running: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except (OSError, ValueError) as exc:
        print(f"meteoritctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(reply, default=_jsonable, indent=2, sort_keys=True))
    elif not reply.get("ok"):
        print(f"meteoritctl: {args.command} failed: {reply.get('error')}", file=sys.stderr)
    else:
        print_human(args.command, reply)
    return EXIT_OK if reply.get("ok") else EXIT_ERROR


def socket_path(args: argparse.Namespace) -> str:
    """From -s, else the config's [control] socket, read leniently: a config with a mistake
    elsewhere must still reach the master, whose reload then names the mistake."""
    if args.socket:
        return args.socket
    default = next(s.default for s in configlib.SETTINGS if s.name == "control.socket")
    if not args.config:
        return default
    try:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", f"cannot read {args.config} to find the control socket ({exc}); "
                          "give the socket with -s") from None
    path = data.get("control", {}).get("socket", default) if isinstance(data.get("control"), dict) else default
    if not isinstance(path, str) or not path:
        raise ConfigError("control.socket", "must be a non-empty string")
    return path


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"cmd": args.command}
    if args.command in ("broadcast", "send"):
        request.update(name=args.name, data=read_data(args.data), wait=args.wait)
        if args.command == "send":
            request["pid"] = args.pid
    elif args.command == "scale":
        request["workers"] = args.workers
    elif args.command == "stop":
        request["graceful"] = args.graceful
    return request


def read_data(spec: str) -> bytes:
    if spec == "-":
        return sys.stdin.buffer.read()
    if spec.startswith("@"):
        with open(spec[1:], "rb") as f:
            return f.read()
    return spec.encode()


def call(path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request, one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NotRunning(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"nobody listens on {path}") from None
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise OSError(f"permission denied on {path}: run as the service's user, root, "
                              "or a member of [control] group") from None
            raise
        body = msgpack.packb(request)
        sock.sendall(LENGTH.pack(len(body)) + body)
        try:
            size = LENGTH.unpack(_read_exactly(sock, LENGTH.size))[0]
            if size > MAX_FRAME:
                raise ValueError(f"reply of {size} bytes is over the limit")
            reply = msgpack.unpackb(_read_exactly(sock, size), strict_map_key=False)
        except socket.timeout:
            raise OSError(f"no reply within {timeout:.0f}s") from None
    if not isinstance(reply, dict):
        raise ValueError("the master sent a reply that is not a map")
    return reply


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise OSError("the master closed the connection before replying")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _jsonable(value: Any) -> Any:
    """Bytes (alert replies) as text when they are UTF-8, else as {"base64": ...}: lossless."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- human output


def print_human(command: str, reply: dict[str, Any]) -> None:
    if command == "status":
        m = reply["master"]
        print(f"meteorit master {m['pid']}, up {duration(m['uptime_seconds'])}, config {m['config_version']}"
              f" ({m['config_path'] or 'defaults'}), {m['workers_wanted']} workers wanted,"
              f" {m['reloads']} reloads, {m['worker_restarts']} restarts")
        redis = m.get("embedded_redis")
        if redis:
            print(f"embedded redis: {redis['state']}, pid {redis['pid'] or '-'}, {redis['restarts']} restarts")
        print_workers(reply["workers"], with_requests=True)
        if reply.get("redis"):
            print_redis(reply["redis"])
        for pid in reply.get("missing_workers", []):
            print(f"worker {pid} did not answer in time", file=sys.stderr)
    elif command == "workers":
        print_workers(reply["workers"], with_requests=False)
    elif command == "stats":
        print_stats(reply)
    elif command == "reload":
        versions = ", ".join(f"{n} on {v}" for v, n in sorted(reply["workers_by_version"].items()))
        what = f"{reply['mode']}: {', '.join(reply['changed'])}" if reply["changed"] else "nothing changed"
        print(f"reloaded: config {reply['version']} ({what}); workers: {versions or 'none'}")
    elif command in ("broadcast", "send"):
        if "replies" not in reply:
            print(f"sent to {len(reply['sent_to'])} process(es): {' '.join(map(str, reply['sent_to']))}")
            return
        for r in reply["replies"]:
            print(f"{r['pid']}: {r['data'].decode(errors='replace')}")
        for pid in reply["missing"]:
            print(f"{pid}: no reply in time", file=sys.stderr)
    elif command == "scale":
        print(f"{reply['workers']} workers serving")
    elif command == "stop":
        print(f"stopping ({reply['stopping']})")


def print_workers(rows: list[dict[str, Any]], with_requests: bool) -> None:
    header = ["SLOT", "PID", "UPTIME", "STATE", "VERSION", "RESTARTS"] + (["REQUESTS"] if with_requests else [])
    table = [header] + [[str(r["slot"]), str(r["pid"]), duration(r["uptime_seconds"]), r["state"], r["version"],
                         str(r["restarts"])] + ([str(r.get("requests", "?"))] if with_requests else [])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_redis(redis: dict[str, Any]) -> None:
    """The queue's Redis as the workers see it: each node and its shards."""
    nodes = redis.get("nodes", {})
    print(f"redis: {redis['mode']}, {redis['shards']} shard(s) on {len(nodes)} primary node(s)")
    for node, entry in sorted(nodes.items()):
        state = "" if entry["reachable"] else "  UNREACHABLE"
        print(f"  {node or '?'}: shards {' '.join(map(str, entry['shards']))}{state}")
    if redis.get("unreachable"):
        print(f"  unreachable shards: {' '.join(map(str, redis['unreachable']))}")


def print_stats(doc: dict[str, Any]) -> None:
    total = doc["total"]
    requests = " ".join(f"{k}={v}" for k, v in sorted(total.get("requests", {}).items()))
    rejected = " ".join(f"{k}={v}" for k, v in sorted(total.get("events_rejected", {}).items()))
    print(f"workers answering: {len(doc['workers'])}, missing: {len(doc['missing_workers'])}")
    print(f"requests: {requests or 'none'}")
    print(f"events accepted: {total.get('events_accepted', 0)}; rejected: {rejected or 'none'}")
    print(f"bytes in: {total.get('bytes_in', 0)}; redis writes: {total.get('redis_writes', 0)},"
          f" errors: {total.get('redis_write_errors', 0)}")
    for w in doc["workers"]:
        print(f"  worker {w['slot']} pid {w['pid']}: {sum(w['requests'].values())} requests,"
              f" {w['events_accepted']} events accepted")
    master = doc.get("master")
    if master:
        print(f"master: {master['worker_restarts']} restarts, {master['reloads']} reloads,"
              f" {master['reload_failures']} failed reloads")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


if __name__ == "__main__":
    sys.exit(main())
