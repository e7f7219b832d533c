"""`meteoritctl top`: a live view of a running meteorit, refreshed every second.

Owns: sampling the master through the control socket (the `workers` and `stats` requests of
`meteoritctl workers` and `stats`), rates from the difference of two samples, the view (a
plain dict, also the `--json` output) and its text frame, and the terminal while it runs:
plain ANSI/VT100 sequences (alternate screen, cursor home, erase) and keys read in cbreak
mode, so it works over ssh in any terminal, with no curses or terminfo entry needed.
Must not touch: anything but the control socket (through ctl.call).

    meteoritctl top               live, on a terminal; q (or Ctrl-C) quits, space refreshes now
    meteoritctl top -n 3          three frames as plain text, one every --delay, then exit 0
    meteoritctl top --json [-n N] one JSON object per frame (N of them, or until interrupted)
Without a terminal, and with neither -n nor --json, it refuses (exit 2) instead of writing
escape sequences into a file. Rates need two samples: the live view shows its first frame at
once with `-` for them; each printed frame (-n, --json) waits for its second sample.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any, TextIO

from . import ctl
from .errors import ConfigError

MIN_DELAY, MAX_DELAY = 0.1, 3600.0  # seconds between refreshes
QUIT_KEYS = b"qQ"
REFRESH_KEY = b" "

# VT100/xterm sequences every terminal emulator (and tmux, screen) understands
ENTER = "\x1b[?1049h\x1b[?25l\x1b[2J"  # alternate screen, hide the cursor, clear
LEAVE = "\x1b[?25h\x1b[?1049l"  # show the cursor, back to the normal screen
HOME, ERASE_LINE, ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"

View = dict[str, Any]


class Quit(Exception):
    """TERM or HUP while live: unwind so the terminal is restored."""


def main(args: argparse.Namespace) -> int:
    if not MIN_DELAY <= args.delay <= MAX_DELAY:
        return _usage(f"--delay must be {MIN_DELAY} to {MAX_DELAY:.0f} seconds")
    if args.iterations is not None and args.iterations < 1:
        return _usage("-n must be 1 or more")
    live = args.iterations is None and not args.json
    if live and not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _usage("top needs a terminal (standard input and output); without one, "
                      "-n N prints N frames as text and --json one JSON object per frame")
    try:
        path = ctl.socket_path(args)
    except (ConfigError, OSError) as exc:
        message = f"{exc.key}: {exc.reason}" if isinstance(exc, ConfigError) else str(exc)
        print(f"meteoritctl: {message}", file=sys.stderr)
        return ctl.EXIT_ERROR
    sampler = Sampler(path, args.timeout if args.timeout is not None else ctl.DEFAULT_TIMEOUT)
    try:
        first = sampler.take()  # before the screen changes: a master not running is exit 3, as elsewhere
    except ctl.NotRunning as exc:
        print(f"meteoritctl: meteorit is not running: {exc}", file=sys.stderr)
        return ctl.EXIT_NOT_RUNNING
    except (OSError, ValueError) as exc:
        print(f"meteoritctl: {exc}", file=sys.stderr)
        return ctl.EXIT_ERROR
    if live:
        return run_live(sampler, first, args.delay)
    return run_batch(sampler, first, args.delay, args.iterations, args.json)


def _usage(message: str) -> int:
    print(f"meteoritctl top: {message}", file=sys.stderr)
    return ctl.EXIT_USAGE


# --- samples and rates


class Sample:
    """One `workers` and one `stats` reply, and when they came."""

    __slots__ = ("at", "rows", "stats")

    def __init__(self, at: float, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        self.at = at
        self.rows = rows
        self.stats = stats

    @property
    def master_pid(self) -> int | None:
        return (self.stats.get("master") or {}).get("pid")

    def snapshots(self) -> dict[int, dict[str, Any]]:
        return {w["pid"]: w for w in self.stats["workers"]}


class Sampler:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def take(self) -> Sample:
        rows = self._ask("workers")["workers"]
        stats = self._ask("stats")
        return Sample(time.monotonic(), rows, stats)

    def _ask(self, command: str) -> dict[str, Any]:
        reply = ctl.call(self.path, {"cmd": command}, self.timeout)
        if not reply.get("ok"):
            raise ValueError(f"{command} failed: {reply.get('error')}")
        return reply


def rate(new: float | None, old: float | None, seconds: float) -> float | None:
    """Per second between two readings of a counter; None when one is missing or it went
    back (a new master, or a worker replaced: its counts started again)."""
    if new is None or old is None or seconds <= 0 or new < old:
        return None
    return (new - old) / seconds


def requests_of(snapshot: dict[str, Any] | None) -> int | None:
    return None if snapshot is None else sum(snapshot.get("requests", {}).values())


def _field(snapshot: dict[str, Any] | None, key: str) -> Any:
    return None if snapshot is None else snapshot.get(key)


def build_view(new: Sample, old: Sample | None, error: str | None = None) -> View:
    """What a frame shows, from the last two samples (rates need both)."""
    if old is not None and old.master_pid != new.master_pid:
        old = None  # another master: its counters are not ours to subtract
    seconds = new.at - old.at if old is not None else 0.0
    total = new.stats["total"]
    before = old.stats["total"] if old is not None else {}
    statuses = sorted(total.get("requests", {}).items(), key=lambda kv: kv[0])
    snaps, old_snaps = new.snapshots(), old.snapshots() if old is not None else {}
    workers = []
    for row in new.rows:
        snap, prev = snaps.get(row["pid"]), old_snaps.get(row["pid"])  # None: no answer in time
        workers.append({
            "slot": row["slot"], "pid": row["pid"], "state": row["state"], "version": row["version"],
            "uptime_seconds": row["uptime_seconds"], "restarts": row["restarts"],
            "requests": requests_of(snap), "events_accepted": _field(snap, "events_accepted"),
            "requests_per_second": rate(requests_of(snap), requests_of(prev), seconds),
            "events_per_second": rate(_field(snap, "events_accepted"), _field(prev, "events_accepted"), seconds),
            **{key: _field(snap, key) for key in ("connections", "redis", "queue_length", "spool_bytes")}})
    answering = list(snaps.values())
    redis_states: dict[str, int] = {}
    for s in answering:
        if s.get("redis"):
            redis_states[s["redis"]] = redis_states.get(s["redis"], 0) + 1
    # a worker that cannot reach Redis only knows a length from before: not worth showing
    queue_lengths = [s["queue_length"] for s in answering
                     if isinstance(s.get("queue_length"), int) and s.get("redis") != "down"]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "interval_seconds": round(seconds, 3) if old else None,
        "master": new.stats.get("master"), "error": error,
        "totals": {"requests": dict(statuses), "events_accepted": total.get("events_accepted", 0),
                   "events_rejected": total.get("events_rejected", {}),
                   "bytes_in": total.get("bytes_in", 0), "redis_writes": total.get("redis_writes", 0),
                   "redis_write_errors": total.get("redis_write_errors", 0),
                   "events_spooled": total.get("events_spooled", 0),
                   "events_replayed": total.get("events_replayed", 0)},
        "rates": {
            "requests": rate(requests_of(total), requests_of(before) if old else None, seconds),
            "events": rate(total.get("events_accepted", 0), before.get("events_accepted") if old else None, seconds),
            "bytes_in": rate(total.get("bytes_in", 0), before.get("bytes_in") if old else None, seconds),
            "redis_writes": rate(total.get("redis_writes", 0), before.get("redis_writes") if old else None, seconds),
            "statuses": {code: rate(n, before.get("requests", {}).get(code, 0) if old else None, seconds)
                         for code, n in statuses}},
        "redis": {"workers_by_state": redis_states, "workers_answering": len(answering),
                  "queue_length": max(queue_lengths) if queue_lengths else None},
        "spool_bytes": sum(s.get("spool_bytes") or 0 for s in answering),
        "workers": workers, "missing_workers": new.stats.get("missing_workers", [])}


# --- the frame


def render(view: View, width: int, height: int, live: bool, delay: float) -> list[str]:
    """The frame as lines, each cut to `width`; worker rows past `height` are summarised."""
    head = _summary(view)
    if view["error"]:
        head.append(f"! {view['error']} (retrying)")
    if view["missing_workers"]:
        head.append(f"! no answer in time from {' '.join(map(str, view['missing_workers']))}")
    table = [["SLOT", "PID", "STATE", "UPTIME", "VER", "REQ/S", "EV/S", "REQUESTS", "EVENTS",
              "CONNS", "REDIS", "QUEUE", "SPOOL"]]
    for w in view["workers"]:
        table.append([str(w["slot"]), str(w["pid"]), w["state"], ctl.duration(w["uptime_seconds"]),
                      str(w["version"]), _rate(w["requests_per_second"]), _rate(w["events_per_second"]),
                      _or(w["requests"]), _or(w["events_accepted"]), _or(w["connections"]), _or(w["redis"]),
                      _or(w["queue_length"]), _bytes(w["spool_bytes"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    rows = ["  ".join(cell.rjust(w) if i >= 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in table]
    foot = [f"q quits, space refreshes; every {delay:g}s"] if live else []
    room = height - len(head) - 1 - len(foot)  # a blank line between the head and the table
    if live and len(rows) > room:
        hidden = len(rows) - max(room - 1, 1)
        rows = rows[:max(room - 1, 1)] + [f"... {hidden} more workers"]
    lines = [line[:width].rstrip() for line in head + [""] + rows + foot]
    return lines[:height] if live else lines


def _summary(view: View) -> list[str]:
    m, rates, totals, redis = view["master"] or {}, view["rates"], view["totals"], view["redis"]
    serving = sum(w["state"] == "serving" for w in view["workers"])
    master = (f"meteorit master {m.get('pid', '?')}  up {ctl.duration(m.get('uptime_seconds', 0))}  "
              f"config {m.get('config_version', '?')}  workers {serving}/{m.get('workers_wanted', '?')} serving  "
              f"restarts {m.get('worker_restarts', 0)}  reloads {m.get('reloads', 0)}"
              f"{'  RELOADING' if m.get('reloading') else ''}  {view['time'][11:]}")
    throughput = (f"req/s {_rate(rates['requests'])}   events/s {_rate(rates['events'])}   "
                  f"in {_bytes(rates['bytes_in'])}/s   redis writes/s {_rate(rates['redis_writes'])}")
    per_status = "  ".join(f"{code} {_rate(r)}" for code, r in rates["statuses"].items()) or "none"
    since_start = "  ".join(f"{code} {n}" for code, n in totals["requests"].items()) or "none"
    rejected = " ".join(f"{k}={v}" for k, v in sorted(totals["events_rejected"].items())) or "0"
    states = ", ".join(f"{state} on {n}" for state, n in sorted(redis["workers_by_state"].items())) or "?"
    states += f" of {redis['workers_answering']} workers"
    return [master, throughput,
            f"statuses/s {per_status}   since start {since_start}",
            (f"events accepted {totals['events_accepted']}  rejected {rejected}"
             f"  redis write errors {totals['redis_write_errors']}"),
            (f"redis {states}   queue {_or(redis['queue_length'])}   spool {_bytes(view['spool_bytes'])}"
             f"   spooled {totals['events_spooled']}  replayed {totals['events_replayed']}")]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _or(value: Any) -> str:
    return "?" if value is None else str(value)


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- batch: -n N, --json


def run_batch(sampler: Sampler, first: Sample, delay: float, iterations: int | None, as_json: bool) -> int:
    previous = first
    for _ in _count(iterations):
        time.sleep(max(0.0, previous.at + delay - time.monotonic()))  # the refresh interval itself
        try:
            sample = sampler.take()
        except ctl.NotRunning as exc:
            print(f"meteoritctl: meteorit is not running: {exc}", file=sys.stderr)
            return ctl.EXIT_NOT_RUNNING
        except (OSError, ValueError) as exc:
            print(f"meteoritctl: {exc}", file=sys.stderr)
            return ctl.EXIT_ERROR
        view = build_view(sample, previous)
        previous = sample
        if as_json:
            print(json.dumps(view, sort_keys=True), flush=True)
        else:
            print("\n".join(render(view, 1 << 16, 1 << 16, live=False, delay=delay)) + "\n", flush=True)
    return ctl.EXIT_OK


def _count(limit: int | None) -> Iterator[int]:
    i = 0
    while limit is None or i < limit:
        yield i
        i += 1


# --- live, on a terminal


def run_live(sampler: Sampler, first: Sample, delay: float) -> int:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    out = sys.stdout

    def quit_on(signum: int, frame: Any) -> None:
        raise Quit()
    previous_handlers = {sig: signal.signal(sig, quit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still interrupts
        out.write(ENTER)
        _loop(sampler, first, delay, fd, out)
    except (KeyboardInterrupt, Quit):
        pass
    finally:
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return ctl.EXIT_OK


def _loop(sampler: Sampler, first: Sample, delay: float, fd: int, out: TextIO) -> None:
    previous: Sample | None = None
    sample, error = first, None
    while True:
        size = shutil.get_terminal_size()
        _draw(out, render(build_view(sample, previous, error), size.columns, size.lines, live=True, delay=delay))
        if _wait_for_quit(fd, sample.at + delay if error is None else time.monotonic() + delay):
            return
        try:
            new = sampler.take()
        except (ctl.NotRunning, OSError, ValueError) as exc:  # shown on the screen; the next tick retries
            error = f"meteorit is not running: {exc}" if isinstance(exc, ctl.NotRunning) else str(exc)
            continue
        # rates over the last interval; after a failed sample, against the last good one
        previous, sample, error = sample, new, None


def _draw(out: TextIO, lines: list[str]) -> None:
    out.write(HOME + "".join(line + ERASE_LINE + "\n" for line in lines[:-1]) + lines[-1] + ERASE_LINE + ERASE_BELOW)
    out.flush()


def _wait_for_quit(fd: int, until: float) -> bool:
    """Read keys until `until`: True for q (or when the terminal is gone), False at the
    deadline or on space (refresh now)."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return False
        keys = os.read(fd, 64)
        if not keys or any(k in QUIT_KEYS for k in keys):  # b"": the terminal hung up
            return True
        if REFRESH_KEY in keys:
            return False
