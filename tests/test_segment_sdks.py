"""Real Segment SDKs, unchanged, pointed at meteorit: Segment's `analytics-python`
(`segment-analytics-python` from PyPI, the test extra) in this process and
`@segment/analytics-node` (tests/node/, installed by `npm ci` there, which .ci/run and
`make test` run) in a node process. Each sends every kind of call; the test finds each
message in Redis with its messageId as `id`, then exactly those rows in SQLite once
meteorit-consumer has run. Then the SDKs' retries: a batch refused 503 (the queue over
`redis.max_queue_length`) is sent again and stored once, and a batch the SDK gave up
waiting for (Redis paused past its timeout) is sent again, lands twice in Redis and is
stored once: the consumer's insert is idempotent by messageId.

A missing SDK fails these tests; it never skips them."""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until

pytestmark = pytest.mark.slow

QUEUE = "meteorit:events"
WRITE_KEY = "wk-sdk-test"
NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_SDK = NODE_DIR / "node_modules" / "@segment" / "analytics-node"
CONSUMER = [sys.executable, "-m", "meteorit.consumer"]
PAUSE_MS = 2500  # Redis holds the worker's RPUSH this long: past the SDK's timeout of 1 s
SDK_TIMEOUT = 1.0


def python_sdk() -> Any:
    try:
        from segment import analytics
    except ImportError:
        pytest.fail("segment-analytics-python is missing: pip install -e '.[test]' (make test does)")
    return analytics


def node() -> str:
    found = shutil.which("node")
    if found is None or not NODE_SDK.is_dir():
        pytest.fail(f"node or @segment/analytics-node is missing: run `npm ci` in {NODE_DIR} "
                    "(.ci/run and make test do; .ci/run installs nodejs and npm)")
    return found


@pytest.fixture
def start(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
          redis_server: RedisServer) -> Callable[..., Meteorit]:
    def make(**redis_settings: Any) -> Meteorit:
        return meteorit_factory({
            "redis": {"url": redis_server.url, **redis_settings},
            "server": {"workers": 1},  # one worker: it alone decides when the queue is over its limit
            "auth": {"keys": [WRITE_KEY]},
            # the worker waits for a paused Redis instead of spooling: the SDK gives up first
            "spool": {"redis_deadline": 30.0},
            "consumer": {"sink": "sqlite:///events.db"},
        })
    return make


def queued(redis: redislib.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis.lrange(QUEUE, 0, -1)]


def as_sent(stored: dict[str, Any]) -> dict[str, Any]:
    """A record without what meteorit added: the message as its SDK sent it."""
    assert stored["id"] == stored["messageId"] and stored["ts"] == stored["timestamp"]
    return {k: v for k, v in stored.items() if k not in ("id", "received_at", "ts")}


def consume(m: Meteorit) -> str:
    """meteorit-consumer --once with the config's sink; its summary line."""
    done = subprocess.run([*CONSUMER, "-c", str(m.config), "--once"], cwd=m.config.parent, capture_output=True,
                          text=True, timeout=60, env=m.env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def rows(m: Meteorit) -> list[tuple[str, str, dict[str, Any]]]:
    with sqlite3.connect(m.config.parent / "events.db") as db:
        found = db.execute("SELECT id, type, ts, event FROM events ORDER BY received_at, id").fetchall()
    assert all(ts == json.loads(event)["timestamp"] for _, _, ts, event in found)  # the SDK's time, a column
    return [(ident, kind, json.loads(event)) for ident, kind, _, event in found]


def served_statuses(m: Meteorit) -> dict[str, int]:
    status, _, body = m.request("GET", "/v1/stats")
    assert status == 200
    return json.loads(body)["total"]["requests"]


def assert_stored_once(m: Meteorit, messages: list[dict[str, Any]]) -> None:
    """After the consumer: one row per message, its id the messageId, its event the record."""
    stored = rows(m)
    assert sorted(ident for ident, _, _ in stored) == sorted(msg["messageId"] for msg in messages)
    by_id = {msg["messageId"]: msg for msg in messages}
    for ident, kind, event in stored:
        assert kind == by_id[ident]["type"] and as_sent(event) == by_id[ident]


# --- analytics-python


class PythonSdk:
    """A Segment client of analytics-python on meteorit, and the requests it made as the
    server answered them (a hook on the SDK's own requests session)."""

    def __init__(self, m: Meteorit, **settings: Any) -> None:
        analytics = python_sdk()
        self.errors: list[Exception] = []
        self.answered: list[tuple[int, int, list[str]]] = []  # status, X-Retry-Count, messageIds
        self.encodings: list[str | None] = []  # the Content-Encoding of each request answered
        self.session = analytics.request._session
        self.session.hooks["response"].append(self._answered)
        self.client = analytics.Client(write_key=WRITE_KEY, host=f"http://{m.base}", upload_interval=0.05,
                                       on_error=lambda error, batch: self.errors.append(error), **settings)

    def _answered(self, response: Any, *args: Any, **kwargs: Any) -> None:
        request = response.request
        self.encodings.append(request.headers.get("Content-Encoding"))
        body = request.body if request.headers.get("Content-Encoding") != "gzip" else gzip.decompress(request.body)
        ids = [msg["messageId"] for msg in json.loads(body)["batch"]]
        self.answered.append((response.status_code, int(request.headers.get("X-Retry-Count", 0)), ids))

    def close(self) -> None:
        self.client.shutdown()  # flushes, then joins the consumer thread
        self.session.hooks["response"].remove(self._answered)


@pytest.fixture
def python_client() -> Iterator[Callable[..., PythonSdk]]:
    made: list[PythonSdk] = []

    def make(m: Meteorit, **settings: Any) -> PythonSdk:
        made.append(PythonSdk(m, **settings))
        return made[-1]

    yield make
    for sdk in made:
        sdk.close()


def every_call(client: Any, n: int = 0) -> list[dict[str, Any]]:
    """One call of each kind; the messages as the SDK queued them (JSON, as it sends them)."""
    sent = [
        client.track(user_id=f"user-{n}", event="Order Completed", properties={"revenue": 42.5, "items": [1, 2]}),
        client.identify(user_id=f"user-{n}", traits={"email": "ada@example.com", "plan": "pro"}),
        client.page(anonymous_id=f"anon-{n}", category="Docs", name="Install", properties={"path": "/install"}),
        client.screen(user_id=f"user-{n}", name="Home", properties={"variant": "b"}),
        client.group(user_id=f"user-{n}", group_id="acme", traits={"seats": 12}),
        client.alias(previous_id=f"anon-{n}", user_id=f"user-{n}"),
    ]
    assert all(ok for ok, _ in sent)
    return [json.loads(json.dumps(msg)) for _, msg in sent]


def test_analytics_python_sends_every_call_and_the_sink_holds_exactly_those(
        start: Callable[..., Meteorit], python_client: Callable[..., PythonSdk], redis: redislib.Redis) -> None:
    m = start()
    sdk = python_client(m, gzip=True)  # the SDK's gzip bodies too
    sent = every_call(sdk.client)
    sdk.client.flush()
    assert sdk.errors == [] and [status for status, _, _ in sdk.answered] == [200] and sdk.encodings == ["gzip"]
    assert [as_sent(r) for r in queued(redis)] == sent  # in order, each as sent, its messageId the id
    assert [r["type"] for r in queued(redis)] == ["track", "identify", "page", "screen", "group", "alias"]
    assert "stored 6 events" in consume(m)
    assert_stored_once(m, sent)


def test_analytics_python_retries_a_503_and_the_sink_holds_each_message_once(
        start: Callable[..., Meteorit], python_client: Callable[..., PythonSdk], redis: redislib.Redis) -> None:
    m = start(max_queue_length=3)
    sdk = python_client(m)
    first = every_call(sdk.client, 1)
    sdk.client.flush()  # 6 in the queue: over 3, the worker now refuses
    second = every_call(sdk.client, 2)
    wait_until(lambda: any(status == 503 for status, _, _ in sdk.answered), 10, "the SDK's batch to get 503")
    consume(m)  # the consumer catches up; the worker sees it within a second
    sdk.client.flush()  # returns once the SDK's retry was taken
    refused = [ids for status, _, ids in sdk.answered if status == 503]
    taken = [ids for status, _, ids in sdk.answered if status == 200]
    assert sdk.errors == [] and taken[-1] == refused[0] == [msg["messageId"] for msg in second]
    consume(m)
    assert_stored_once(m, first + second)
    assert redis.llen(QUEUE) == 0


def test_analytics_python_resends_a_batch_it_timed_out_on_and_the_sink_holds_it_once(
        start: Callable[..., Meteorit], python_client: Callable[..., PythonSdk], redis: redislib.Redis) -> None:
    m = start()
    sdk = python_client(m, timeout=SDK_TIMEOUT)
    redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")  # the worker's RPUSH waits, the SDK times out
    try:
        sent = every_call(sdk.client, 3)
        sdk.client.flush()
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
    assert sdk.errors == []
    [(status, retries, ids)] = sdk.answered  # the attempts that timed out got no answer
    assert status == 200 and retries >= 1 and ids == [msg["messageId"] for msg in sent]
    copies = [r["id"] for r in queued(redis)]
    assert set(copies) == set(ids) and all(copies.count(i) >= 2 for i in ids)  # the first try landed too
    summary = consume(m)
    assert f"{len(copies) - len(ids)} duplicates skipped" in summary
    assert_stored_once(m, sent)


# --- @segment/analytics-node


def run_node(m: Meteorit, calls: list[dict[str, Any]], **settings: Any) -> subprocess.Popen[str]:
    spec = {"host": f"http://{m.base}", "writeKey": WRITE_KEY, "calls": calls,
            "settings": {"flushAt": len(calls), "flushInterval": 200, **settings}}
    return subprocess.Popen([node(), str(NODE_DIR / "send.js"), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def node_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    assert result["failed"] == [], result["failed"]
    return result


def node_calls(n: int = 0) -> list[dict[str, Any]]:
    user, anon = f"user-{n}", f"anon-{n}"
    return [
        {"method": "track", "params": {"userId": user, "event": "Order Completed",
                                       "properties": {"revenue": 42.5, "items": [1, 2]}}},
        {"method": "identify", "params": {"userId": user, "traits": {"email": "ada@example.com"}}},
        {"method": "page", "params": {"anonymousId": anon, "category": "Docs", "name": "Install",
                                      "properties": {"path": "/install"}}},
        {"method": "screen", "params": {"userId": user, "name": "Home"}},
        {"method": "group", "params": {"userId": user, "groupId": "acme", "traits": {"seats": 12}}},
        {"method": "alias", "params": {"userId": user, "previousId": anon}},
    ]


def test_analytics_node_sends_every_call_and_the_sink_holds_exactly_those(
        start: Callable[..., Meteorit], redis: redislib.Redis) -> None:
    m = start()
    result = node_result(run_node(m, node_calls()))
    sent = result["delivered"]
    assert result["statuses"] == [200] and result["requests"][0]["url"] == f"http://{m.base}/v1/batch"
    stored = queued(redis)
    assert sorted(r["id"] for r in stored) == sorted(msg["messageId"] for msg in sent)
    by_id = {msg["messageId"]: msg for msg in sent}
    assert all(as_sent(r) == by_id[r["id"]] for r in stored)
    assert sorted(r["type"] for r in stored) == sorted(["track", "identify", "page", "screen", "group", "alias"])
    assert "stored 6 events" in consume(m)
    assert_stored_once(m, sent)


def test_analytics_node_retries_a_503_and_the_sink_holds_each_message_once(
        start: Callable[..., Meteorit], redis: redislib.Redis) -> None:
    m = start(max_queue_length=3)
    first = node_result(run_node(m, node_calls(1)[:5]))["delivered"]
    before = served_statuses(m).get("503", 0)
    proc = run_node(m, node_calls(2))
    wait_until(lambda: served_statuses(m).get("503", 0) > before, 15, "the SDK's batch to get 503")
    consume(m)  # the consumer catches up; the worker sees it within a second, the SDK retries after 1-2 s
    result = node_result(proc)
    second = result["delivered"]
    assert result["statuses"][0] == 503 and result["statuses"][-1] == 200
    assert [r["messageIds"] for r in result["requests"]] == [[msg["messageId"] for msg in second]] * len(
        result["requests"])  # every try the same batch
    consume(m)
    assert_stored_once(m, first + second)


def test_analytics_node_resends_a_batch_it_timed_out_on_and_the_sink_holds_it_once(
        start: Callable[..., Meteorit], redis: redislib.Redis) -> None:
    m = start()
    redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    try:
        result = node_result(run_node(m, node_calls(3), httpRequestTimeout=int(SDK_TIMEOUT * 1000)))
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
    sent = result["delivered"]
    ids = sorted(msg["messageId"] for msg in sent)
    assert len(result["requests"]) >= 2 and result["statuses"][-1] == 200  # the timed-out try got no status
    assert all(sorted(r["messageIds"]) == ids for r in result["requests"])
    copies = [r["id"] for r in queued(redis)]
    assert sorted(set(copies)) == ids and all(copies.count(i) >= 2 for i in ids)
    assert f"{len(copies) - len(ids)} duplicates skipped" in consume(m)
    assert_stored_once(m, sent)


def test_the_sdk_helpers_fail_rather_than_skip_without_their_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "NODE_SDK", NODE_DIR / "not-installed")
    with pytest.raises(pytest.fail.Exception, match="npm ci"):
        node()
    monkeypatch.setitem(sys.modules, "segment", None)  # import fails as for a missing package
    with pytest.raises(pytest.fail.Exception, match="segment-analytics-python is missing"):
        python_sdk()
