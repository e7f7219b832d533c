"""`meteoritctl`: drive a running meteorit through its control socket.

Owns: the client side of the control protocol (see control.py), argument parsing, human
and `--json` output, and LSB exit codes: 0 ok, 1 error, 2 bad arguments, 3 not running.
Must not touch: anything but the socket: it never signals or reads the master's files.

    meteoritctl [-s SOCKET | -c CONFIG] [--json] COMMAND    (-s wins over -c)
      status | workers | stats | reload | scale N | stop [--graceful]
      broadcast NAME [DATA] [--wait SECONDS]
      send PID NAME [DATA] [--wait SECONDS]
DATA is text, `@FILE` (the file's bytes) or `-` (standard input), so alerts larger than a
command line work.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meteoritctl", description="Control a running meteorit.")
    p.add_argument("-s", "--socket", help="the control socket (default: from the config)")
    p.add_argument("-c", "--config", default=os.environ.get("METEORIT_CONFIG"),
                       help="the config file whose [control] socket to use (default: $METEORIT_CONFIG)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up waiting for the reply")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="master and workers: pids, uptime, version, requests, restarts")
    sub.add_parser("workers", help="the workers the master runs")
    sub.add_parser("stats", help="every worker's counters and their sum")
    sub.add_parser("reload", help="re-read the config and apply it without dropping a request")
    b = sub.add_parser("broadcast", help="send an alert to every worker")
    b.add_argument("name")
    b.add_argument("data", nargs="?", default="", help="text, @FILE or - for stdin")
    b.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="print the replies")
    s = sub.add_parser("send", help="send an alert to one process")
    s.add_argument("pid", type=int)
    s.add_argument("name")
    s.add_argument("data", nargs="?", default="", help="text, @FILE or - for stdin")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="print the reply")
    n = sub.add_parser("scale", help="run N workers (started, or stopped gracefully)")
    n.add_argument("workers", type=int)
    st = sub.add_parser("stop", help="stop meteorit (fast, or --graceful)")
    st.add_argument("--graceful", action="store_true", help="finish in-flight requests first")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
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
