"""The Segment tracking API over real HTTP, to the real master and workers and a real
redis-server: both ways of authenticating, the mapping into queue records (seen in Redis),
the batch's context merged into its messages, single calls, Segment's limits, gzip bodies,
CORS, and the statuses the SDKs act on (200, 400, 401, 403, 429 and 503 with Retry-After).
(tests/test_segment_sdks.py sends through the real SDKs.)"""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until
from test_compression import bomb

pytestmark = pytest.mark.slow

QUEUE = "meteorit:events"
SECRET = "sk-segment-secret"
PUBLIC = "pk-segment-public"
SHOP = "https://shop.example"
KiB = 1024


def basic(key: str, password: str = "") -> dict[str, str]:
    """As the SDKs send a write key: HTTP Basic, the key as the user name, no password."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}


def track(n: int, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": f"msg-{n}",
            "properties": {"n": n}, **fields}


@pytest.fixture(scope="module")
def segment_api(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Meteorit]:
    m = Meteorit(tmp_path_factory.mktemp("segment-api"), {
        "redis": {"url": redis_server.url},
        "auth": {"keys": [SECRET], "public_keys": [PUBLIC]},
        "http": {"cors_origins": [SHOP]},
        "events": {"context": ["ip"]},
    })
    m.start()
    yield m
    m.stop()


@pytest.fixture
def served(segment_api: Meteorit, redis: redislib.Redis) -> Meteorit:
    return segment_api  # `redis` empties the queue before each test


def send(m: Meteorit, path: str, doc: Any, headers: dict[str, str] | None = None,
         content_type: str = "application/json") -> tuple[int, dict[str, str], Any]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    status, got, data = m.request("POST", path, raw, {"Content-Type": content_type, **(headers or {})})
    return status, got, json.loads(data) if data else None


def queued(redis: redislib.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis.lrange(QUEUE, 0, -1)]


def stats(m: Meteorit) -> dict[str, Any]:
    return m.ctl_json("stats")["total"]


# --- authentication, both ways


def test_basic_auth_with_the_write_key_and_an_empty_password(served: Meteorit, redis: redislib.Redis) -> None:
    status, headers, reply = send(served, "/v1/batch", {"batch": [track(1), track(2)]}, basic(SECRET))
    assert (status, reply) == (200, {"success": True})
    assert headers["Content-Type"] == "application/json"
    assert [(e["type"], e["id"], e["messageId"]) for e in queued(redis)] == [
        ("track", "msg-1", "msg-1"), ("track", "msg-2", "msg-2")]


def test_the_write_key_in_the_body_is_taken_and_never_stored(served: Meteorit, redis: redislib.Redis) -> None:
    assert send(served, "/v1/batch", {"writeKey": SECRET, "batch": [track(1, writeKey=SECRET)]})[0] == 200
    assert send(served, "/v1/track", {**track(2), "writeKey": PUBLIC})[0] == 200
    assert [e["id"] for e in queued(redis)] == ["msg-1", "msg-2"]
    raw = b"".join(redis.lrange(QUEUE, 0, -1))
    assert b"writeKey" not in raw and SECRET.encode() not in raw and PUBLIC.encode() not in raw
    log = served.log_path.read_text()
    assert SECRET not in log and PUBLIC not in log


@pytest.mark.parametrize("headers,doc", [
    ({}, {"batch": [track(1)]}),
    (basic("wrong"), {"batch": [track(1)]}),
    (basic(SECRET, "a-password"), {"batch": [track(1)]}),
    ({}, {"writeKey": "wrong", "batch": [track(1)]}),
    ({}, {"writeKey": 42, "batch": [track(1)]}),
    (basic("wrong"), {"writeKey": SECRET, "batch": [track(1)]}),  # the header is what counts
])
def test_no_valid_write_key_is_401_and_nothing_is_queued(served: Meteorit, redis: redislib.Redis,
                                                         headers: dict[str, str], doc: Any) -> None:
    status, got, reply = send(served, "/v1/batch", doc, headers)
    assert status == 401 and reply["success"] is False and reply["code"] == "unauthorized"
    assert got["WWW-Authenticate"] == 'Basic realm="meteorit"'
    assert redis.llen(QUEUE) == 0


def test_a_public_write_key_follows_the_origin_rules(served: Meteorit, redis: redislib.Redis) -> None:
    doc = {"writeKey": PUBLIC, "batch": [track(1)]}
    status, headers, _ = send(served, "/v1/batch", doc, {"Origin": SHOP}, "text/plain")  # as a page sends it
    assert status == 200 and headers["Access-Control-Allow-Origin"] == SHOP
    status, headers, reply = send(served, "/v1/batch", doc, {"Origin": "https://evil.example"})
    assert (status, reply["code"]) == (403, "forbidden") and "Access-Control-Allow-Origin" not in headers
    assert send(served, f"/v1/batch?key={PUBLIC}", {"batch": [track(2)]})[0] == 200  # as on /v1/events
    assert [e["id"] for e in queued(redis)] == ["msg-1", "msg-2"]


def test_basic_auth_works_on_the_plain_api_too(served: Meteorit, redis: redislib.Redis) -> None:
    status, _, reply = send(served, "/v1/events", {"type": "pageview"}, basic(SECRET))
    assert (status, reply) == (202, {"accepted": 1})


def test_a_preflight_on_a_segment_path_and_the_wrong_method(served: Meteorit) -> None:
    status, headers, _ = served.request("OPTIONS", "/v1/batch", headers={
        "Origin": SHOP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert status == 204 and headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    status, headers, _ = served.request("GET", "/v1/track")
    assert (status, headers["Allow"]) == (405, "POST, OPTIONS")


# --- mapping


def test_the_batch_context_and_integrations_are_merged_into_each_message(served: Meteorit,
                                                                         redis: redislib.Redis) -> None:
    doc = {"context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "ip": "203.0.113.9"},
           "integrations": {"All": False, "Warehouse": True}, "sentAt": "2026-05-01T10:00:00.000Z",
           "batch": [track(1), track(2, context={"locale": "fr-FR"}, integrations={"All": True})]}
    assert send(served, "/v1/batch", doc, basic(SECRET))[0] == 200
    first, second = queued(redis)
    library = {"name": "analytics-python", "version": "2.4.0"}
    # events.context = ["ip"]: meteorit's ip over the client's, as on /v1/events
    assert first["context"] == {"library": library, "ip": "127.0.0.1"}
    assert second["context"] == {"library": library, "ip": "127.0.0.1", "locale": "fr-FR"}
    assert (first["integrations"], second["integrations"]) == ({"All": False, "Warehouse": True},
                                                               {"All": True, "Warehouse": True})
    assert first["properties"] == {"n": 1} and isinstance(first["received_at"], int)
    assert "sentAt" not in first and "batch" not in first


@pytest.mark.parametrize("call", ["track", "identify", "page", "screen", "group", "alias"])
def test_a_single_call_sets_the_type_from_its_path(served: Meteorit, redis: redislib.Redis, call: str) -> None:
    message = {"userId": "u-1", "event": "Clicked", "groupId": "g-1", "previousId": "anon-1",
               "messageId": f"{call}-1", "timestamp": "2026-05-01T10:00:00.000Z"}
    status, _, reply = send(served, f"/v1/{call}", message, basic(SECRET))
    assert (status, reply) == (200, {"success": True})
    [stored] = queued(redis)
    assert stored == {**message, "type": call, "id": f"{call}-1", "received_at": stored["received_at"],
                      "ts": message["timestamp"], "context": {"ip": "127.0.0.1"}}


def test_a_message_without_message_id_gets_a_time_ordered_id(served: Meteorit, redis: redislib.Redis) -> None:
    assert send(served, "/v1/identify", {"anonymousId": "a-1", "traits": {"plan": "pro"}}, basic(SECRET))[0] == 200
    [stored] = queued(redis)
    assert len(stored["id"]) == 36 and stored["id"][14] == "7" and "messageId" not in stored


# --- refusals the SDKs drop: 400, the reason, nothing queued


@pytest.mark.parametrize(("path", "doc", "reason", "index"), [
    ("/v1/batch", {"batch": [track(1), {"type": "track", "userId": "u"}]}, "a track message needs \"event\"", 1),
    ("/v1/batch", {"batch": [track(1), {"type": "page", "name": "Home"}]}, "needs \"userId\" or \"anonymousId\"", 1),
    ("/v1/batch", {"batch": [track(1, messageId="m" * 129)]}, "\"messageId\" must be a non-empty string", 0),
    ("/v1/batch", {"batch": [track(1), track(2, type="pageview")]}, "\"type\" must be one of", 1),
    ("/v1/batch", {"batch": []}, "no messages in the batch", None),
    ("/v1/batch", b"{\"batch\": [", "body is not valid JSON", None),
    ("/v1/track", {"userId": "u-1"}, "a track message needs \"event\"", 0),
    ("/v1/track", {"type": "identify", "userId": "u-1"}, "\"type\" must be \"track\"", 0),
    ("/v1/group", {"userId": "u-1"}, "a group message needs \"groupId\"", 0),
])
def test_a_bad_payload_is_400_with_the_reason_and_nothing_is_queued(
        served: Meteorit, redis: redislib.Redis, path: str, doc: Any, reason: str, index: int | None) -> None:
    status, _, reply = send(served, path, doc, basic(SECRET))
    assert status == 400 and reason in reply["error"] and reply["message"] == reply["error"]
    assert reply.get("index") == index and reply["code"] == "invalid" and reply["success"] is False
    assert redis.llen(QUEUE) == 0


def padded(n: int, size: int) -> dict[str, Any]:
    """A track message whose compact JSON is `size` bytes."""
    message = track(n, properties={"pad": ""})
    message["properties"]["pad"] = "x" * (size - len(json.dumps(message, separators=(",", ":"))))
    return message


def test_32_kib_a_message_and_500_kib_a_batch_then_400(served: Meteorit, redis: redislib.Redis) -> None:
    assert send(served, "/v1/batch", {"batch": [padded(1, 32 * KiB)]}, basic(SECRET))[0] == 200
    status, _, reply = send(served, "/v1/batch", {"batch": [track(2), padded(3, 32 * KiB + 1)]}, basic(SECRET))
    assert (status, reply["index"], reply["code"]) == (400, 1, "too_large")
    assert reply["error"] == f"message is {32 * KiB + 1} bytes; the limit is {32 * KiB}"
    # fifteen messages of 32 KiB: 480 KiB and some, as the Node SDK fills a batch
    full = json.dumps({"batch": [padded(10 + n, 32 * KiB) for n in range(15)]}).encode()
    assert len(full) <= 500 * KiB and send(served, "/v1/batch", full, basic(SECRET))[0] == 200
    over = json.dumps({"batch": [padded(30 + n, 32 * KiB) for n in range(16)]}).encode()
    status, _, reply = send(served, "/v1/batch", over, basic(SECRET))
    assert status == 400 and reply["error"] == f"body is {len(over)} bytes; the limit for a batch is {500 * KiB}"
    status, _, reply = send(served, "/v1/track", padded(50, 32 * KiB + 1), basic(SECRET))
    assert status == 400 and "the limit for a single call is 32768" in reply["error"]
    assert len(queued(redis)) == 16


def test_the_sizes_come_from_the_config(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                                        redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url},
                          "segment": {"max_message_size": "1KiB", "max_batch_size": "4KiB"},
                          "limits": {"max_events_per_request": 3}})
    assert send(m, "/v1/batch", {"batch": [padded(1, 1024)]})[0] == 200  # auth off: no key needed
    assert send(m, "/v1/batch", {"batch": [padded(2, 1025)]})[2]["index"] == 0
    assert "limit for a batch is 4096" in send(m, "/v1/batch", {"batch": [padded(n, 1000) for n in range(5)]})[2]["error"]
    status, _, reply = send(m, "/v1/batch", {"batch": [track(n) for n in range(4)]})
    assert status == 400 and reply["error"] == "4 messages in one batch; the limit is 3"
    assert redis.llen(QUEUE) == 1


def test_not_json_is_400(served: Meteorit, redis: redislib.Redis) -> None:
    status, _, reply = send(served, "/v1/batch", {"batch": [track(1)]}, basic(SECRET), "application/x-ndjson")
    assert status == 400 and reply["error"] == "use Content-Type application/json"
    assert send(served, "/v1/batch", json.dumps({"batch": [track(1)]}).encode(), basic(SECRET),
                "application/json; charset=utf-8")[0] == 200
    assert redis.llen(QUEUE) == 1


# --- gzip, as the SDKs send it with gzip on


def test_a_gzip_batch_is_taken_and_a_bad_one_is_400(served: Meteorit, redis: redislib.Redis) -> None:
    packed = gzip.compress(json.dumps({"batch": [track(n) for n in range(20)]}).encode())
    status, _, reply = send(served, "/v1/batch", packed, {**basic(SECRET), "Content-Encoding": "gzip"})
    assert (status, reply) == (200, {"success": True})
    assert [e["id"] for e in queued(redis)] == [f"msg-{n}" for n in range(20)]
    for body, encoding, reason in ((packed[:40], "gzip", "truncated"), (packed, "br", "Content-Encoding"),
                                   (gzip.compress(b" " * (600 * KiB)), "gzip", "limit for a batch")):
        status, _, reply = send(served, "/v1/batch", body, {**basic(SECRET), "Content-Encoding": encoding})
        assert status == 400 and reason in reply["error"], encoding
    status, _, reply = send(served, "/v1/batch", bomb(2), {**basic(SECRET), "Content-Encoding": "gzip"})
    assert status == 400 and "inflates past" in reply["error"]  # past limits.max_body, as on /v1/events
    assert redis.llen(QUEUE) == 20


# --- backpressure the SDKs retry: 429 and 503 with Retry-After


def test_429_and_503_carry_retry_after(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                                       redis_server: RedisServer) -> None:
    keys = ["wk-a", "wk-b"]
    m = meteorit_factory({"redis": {"url": redis_server.url, "max_queue_length": 3}, "server": {"workers": 1},
                          "auth": {"keys": keys}, "limits": {"key_rate": 1, "key_burst": 1}})
    before = stats(m)
    assert send(m, "/v1/batch", {"batch": [track(n) for n in range(5)]}, basic("wk-a"))[0] == 200
    # the queue now holds 5 > 3: the next request that passes its key's rate gets 503
    status, headers, reply = send(m, "/v1/batch", {"batch": [track(9)]}, basic("wk-b"))
    assert (status, headers["Retry-After"], reply["code"]) == (503, "1", "unavailable")
    assert "max_queue_length" in reply["error"]
    status, headers, reply = send(m, "/v1/batch", {"batch": [track(10)]}, basic("wk-a"))  # its bucket is empty
    assert (status, reply["code"]) == (429, "rate_limited") and int(headers["Retry-After"]) >= 1
    assert redis.llen(QUEUE) == 5
    after = stats(m)
    assert after["events_accepted"] - before["events_accepted"] == 5
    assert after["requests"]["503"] == before["requests"].get("503", 0) + 1
    assert after["requests"]["429"] == before["requests"].get("429", 0) + 1
    redis.delete(QUEUE)  # the consumer caught up: the worker sees it within a second, and takes again
    wait_until(lambda: send(m, "/v1/batch", {"batch": [track(11)]}, basic("wk-b"))[0] == 200, 10,
               "the queue to be taken again")
