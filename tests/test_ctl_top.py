"""`meteoritctl top`: rates from two samples, and what a user sees: the live screen in a
real terminal (tmux, read back with capture-pane; q quits), plain frames and JSON without
one, Redis going down and the spool filling, all against a real meteorit and redis-server."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until
from meteorit import ctltop

TMUX = shutil.which("tmux")


# --- rates and the frame, from samples made by hand


def sample(at: float, master_pid: int = 100, events: tuple[int, ...] = (10, 20),
           requests: tuple[int, ...] = (1, 2), **worker: Any) -> ctltop.Sample:
    snaps = [{"pid": 1000 + slot, "slot": slot, "events_accepted": e, "requests": {"202": r},
              "connections": 1, "redis": "up", "queue_length": 5, "spool_bytes": 0, **worker}
             for slot, (e, r) in enumerate(zip(events, requests))]
    rows = [{"slot": s["slot"], "pid": s["pid"], "state": "serving", "version": "v1", "uptime_seconds": at,
             "restarts": 0} for s in snaps]
    total = {"events_accepted": sum(events), "requests": {"202": sum(requests)}, "bytes_in": 0,
             "redis_writes": 0}
    master = {"pid": master_pid, "uptime_seconds": at, "config_version": "v1", "workers_wanted": 2}
    return ctltop.Sample(at, rows, {"total": total, "workers": snaps, "missing_workers": [], "master": master})


def test_rates_are_the_difference_of_two_samples_over_their_interval() -> None:
    view = ctltop.build_view(sample(12.0, events=(30, 60), requests=(5, 10)), sample(10.0))
    assert view["rates"]["events"] == 30.0 and view["rates"]["requests"] == 6.0
    assert view["rates"]["statuses"] == {"202": 6.0}
    assert [w["events_per_second"] for w in view["workers"]] == [10.0, 20.0]
    assert view["interval_seconds"] == 2.0


def test_no_rate_without_a_previous_sample_or_when_counters_start_again() -> None:
    first = ctltop.build_view(sample(10.0), None)
    assert first["rates"]["events"] is None and first["workers"][0]["events_per_second"] is None
    new_master = ctltop.build_view(sample(12.0, master_pid=200), sample(10.0))
    assert new_master["rates"]["events"] is None
    went_back = ctltop.build_view(sample(12.0, events=(0, 25)), sample(10.0))  # worker 0's counts restarted
    assert [w["events_per_second"] for w in went_back["workers"]] == [None, 2.5]


def test_the_frame_shows_rates_redis_and_spool_and_fits_the_terminal() -> None:
    old = sample(10.0)
    new = sample(11.0, events=(15, 20), redis="down", spool_bytes=3 * 1024, queue_length=7)
    lines = ctltop.render(ctltop.build_view(new, old), width=60, height=12, live=True, delay=1.0)
    assert len(lines) <= 12 and all(len(line) <= 60 for line in lines)
    text = "\n".join(ctltop.render(ctltop.build_view(new, old), 500, 500, live=False, delay=1.0))
    assert "events/s 5.0" in text and "redis down on 2 of 2 workers" in text
    assert "queue ?" in text  # a length from before Redis went down is not shown as current
    assert "spool 6.0 KiB" in text
    many = sample(11.0, events=tuple(range(30)), requests=tuple(range(30)))
    lines = ctltop.render(ctltop.build_view(many, None), width=200, height=15, live=True, delay=1.0)
    assert len(lines) == 15 and any("more workers" in line for line in lines)


# --- against a real meteorit


@pytest.fixture
def served(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
           redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url}})


class Terminal:
    """A detached tmux session on a server of its own, running one command."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        if TMUX is None:
            pytest.fail("tmux is not installed: run .ci/run or apt-get install tmux")
        self.env = {k: v for k, v in env.items() if k != "TMUX"}  # not nested in a tmux around the tests
        self.server = f"meteorit-test-{uuid.uuid4().hex[:8]}"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "160", "-y", "40",
                  "-c", str(cwd), command)

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run([TMUX, "-L", self.server, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def close(self) -> None:
        subprocess.run([TMUX or "tmux", "-L", self.server, "kill-server"], env=self.env, capture_output=True,
                       check=False)  # gone already when the command's exit closed the session


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_(command: str, cwd: Path, env: dict[str, str]) -> Terminal:
        opened.append(Terminal(command, cwd, env))
        return opened[-1]
    yield open_
    for t in opened:
        t.close()


def figure(screen: str, label: str) -> float | None:
    found = re.search(rf"(?m)(?:^|\s){re.escape(label)} (\d+\.\d)", screen)
    return float(found.group(1)) if found else None


@pytest.mark.slow
def test_top_live_in_a_terminal_shows_workers_and_rates_and_quits_on_q(
        served: Meteorit, terminal: Callable[..., Terminal], tmp_path: Path) -> None:
    for _ in range(5):
        assert served.post([{"type": "before"}] * 3)[0] == 202
    pids = set(served.worker_pids().values())
    rc_file = tmp_path / "top.rc"
    command = (f"{shlex.quote(sys.executable)} -m meteorit.ctl -c {shlex.quote(str(served.config))} top; "
               f"echo $? > {shlex.quote(str(rc_file))}")
    term = terminal(command, served.config.parent, served.env)

    def screen_with_traffic() -> str | None:
        assert served.post([{"type": "live"}] * 2)[0] == 202  # keeps the rates above zero
        screen = term.screen()
        events, requests = figure(screen, "events/s"), figure(screen, "req/s")
        shows_workers = all(re.search(rf"(?m)^\d+\s+{pid}\s+serving\b", screen) for pid in pids)
        return screen if shows_workers and events and requests else None
    screen = wait_until(screen_with_traffic, 30, "top to show both workers and non-zero rates")
    assert re.search(r"statuses/s .*\b202 (?!0\.0\b)\d+\.\d", screen), screen  # /healthz's 200s too
    assert "redis up on 2 of 2 workers" in screen and "spool 0 B" in screen
    assert not rc_file.exists()  # still running: it only quits on q

    term.tmux("send-keys", "-t", "top", "q")
    wait_until(lambda: rc_file.exists() and rc_file.read_text().strip(), 10, "top to quit on q")
    assert rc_file.read_text().strip() == "0"


@pytest.mark.slow
def test_top_without_a_terminal_refuses_or_prints_frames(served: Meteorit, redis: redislib.Redis,
                                                         tmp_path: Path) -> None:
    pids = set(served.worker_pids().values())
    for _ in range(4):
        assert served.post([{"type": "a"}] * 5)[0] == 202
    refused = served.ctl("top")  # stdout is a pipe: no escape sequences into it
    assert refused.returncode == 2 and "needs a terminal" in refused.stderr and refused.stdout == ""

    done = served.ctl("top", "-n", "2", "-d", "0.2")
    assert done.returncode == 0, done.stderr
    frames = done.stdout.split("meteorit master ")[1:]
    assert len(frames) == 2 and "\x1b" not in done.stdout
    for frame in frames:
        assert all(str(pid) in frame for pid in pids) and "events accepted 20" in frame

    done = served.ctl("--json", "top", "-n", "1", "-d", "0.2")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert {w["pid"] for w in view["workers"]} == pids
    assert view["totals"]["events_accepted"] == 20 == redis.llen("meteorit:events")
    assert view["redis"] == {"workers_by_state": {"up": 2}, "workers_answering": 2, "queue_length": 20}
    assert view["spool_bytes"] == 0 and view["rates"]["events"] == 0.0

    for bad in (["-n", "0"], ["-d", "0"], ["-d", "-1"], ["-n", "many"]):
        assert served.ctl("top", *bad).returncode == 2, bad
    nowhere = served.ctl("top", "-n", "1", "-s", str(tmp_path / "nobody.sock"))
    assert nowhere.returncode == 3 and "not running" in nowhere.stderr


@pytest.mark.slow
def test_top_shows_redis_down_and_the_spool_filling(served: Meteorit, redis_server: RedisServer) -> None:
    redis_server.stop()  # the `redis` fixture starts it again for the next test

    def both_down() -> dict[str, Any] | None:
        assert served.post([{"type": "while down"}] * 5)[1].get("spooled") is True
        done = served.ctl("top", "--json", "-n", "1", "-d", "0.1")
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
        spooling = all(w["spool_bytes"] > 0 for w in view["workers"])  # each took some of the posts
        return view if view["redis"]["workers_by_state"] == {"down": 2} and spooling else None
    view = wait_until(both_down, 30, "both workers to see Redis down and spool")
    assert view["spool_bytes"] == sum(w["spool_bytes"] for w in view["workers"])
    assert view["totals"]["events_spooled"] >= 10
    assert view["redis"]["queue_length"] is None  # the last length seen is stale: not shown
