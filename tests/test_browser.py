"""The browser face end to end, over real HTTP to the real master and workers and a real
redis-server: CORS preflights and response headers, public keys in the query string, the
pixel, compressed bodies, request context, the snippet, and their counters. (A real
browser drives the same through tests/test_chromium.py.)"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until
from test_control import rewrite
from test_compression import bomb

pytestmark = pytest.mark.slow

QUEUE = "meteorit:events"
SECRET = "sk-secret-browser"
PUBLIC = "pk-public-browser"
SHOP = "https://shop.example"
JSON = {"Content-Type": "application/json"}
GIF_MAGIC = b"GIF89a"
MAX_BODY = 64 * 1024
SNIPPET = Path(__file__).resolve().parent.parent / "meteorit" / "worker" / "static" / "meteorit.js"


@pytest.fixture(scope="module")
def browser_face(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Meteorit]:
    """One meteorit with every browser setting on, shared by the tests of this module."""
    m = Meteorit(tmp_path_factory.mktemp("browser-face"), {
        "redis": {"url": redis_server.url},
        "auth": {"keys": [SECRET], "public_keys": [PUBLIC]},
        "http": {"cors_origins": [SHOP, "https://*.shop.example", "http://localhost:8000"]},
        "events": {"context": ["ip", "user_agent", "referer", "origin"]},
        "limits": {"max_body": MAX_BODY},
    })
    m.start()
    yield m
    m.stop()


@pytest.fixture
def served(browser_face: Meteorit, redis: redislib.Redis) -> Meteorit:
    return browser_face  # `redis` empties the queue before each test


def queued(redis: redislib.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis.lrange(QUEUE, 0, -1)]


def stats(m: Meteorit) -> dict[str, Any]:
    """Every worker's counters summed, gathered now (/v1/stats may answer from its 0.5 s cache)."""
    return m.ctl_json("stats")["total"]


def counted(m: Meteorit, read: Callable[[dict[str, Any]], Any], expected: Any) -> None:
    assert read(stats(m)) == expected


def post(m: Meteorit, body: bytes | str, path: str = "/v1/events",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    status, got, data = m.request("POST", path, body, {**JSON, **(headers or {})})
    return status, got, json.loads(data) if data else None


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-") or k.lower() == "vary"}


# --- CORS


def test_a_preflight_from_an_allowed_origin_gets_204_and_the_cors_headers(served: Meteorit) -> None:
    status, headers, body = served.request("OPTIONS", "/v1/events", headers={
        "Origin": SHOP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key, content-encoding"})
    assert (status, body) == (204, b"")
    assert "Content-Length" not in headers  # none on a 204 (RFC 9110)
    assert headers["Access-Control-Allow-Origin"] == SHOP
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization", "x-api-key", "content-encoding"} <= allowed
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in headers


def test_a_wildcard_allows_subdomains_and_not_the_look_alikes(served: Meteorit) -> None:
    for origin, allowed in (("https://www.shop.example", True), ("https://a.b.shop.example", True),
                            ("https://evilshop.example", False), ("http://www.shop.example", False),
                            ("https://shop.example.evil", False)):
        status, headers, _ = served.request("OPTIONS", "/v1/events", headers={"Origin": origin})
        assert (status == 204) is allowed, origin
        assert headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)


def test_a_preflight_from_another_origin_gets_no_cors_header_and_is_counted(served: Meteorit) -> None:
    before = stats(served).get("cors_refused", 0)
    status, headers, body = served.request("OPTIONS", "/v1/events", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "origin" in json.loads(body)["error"]
    assert cors_headers(headers) == {}
    counted(served, lambda t: t["cors_refused"], before + 1)


def test_options_without_an_origin_tells_the_methods(served: Meteorit) -> None:
    for path, allow in (("/v1/events", "POST, OPTIONS"), ("/v1/pixel.gif", "GET, OPTIONS"),
                        ("/v1/meteorit.js", "GET, OPTIONS")):
        status, headers, _ = served.request("OPTIONS", path)
        assert (status, headers["Allow"]) == (204, allow)
        assert cors_headers(headers) == {}
        status, headers, _ = served.request("OPTIONS", path, headers={"Origin": SHOP})
        assert headers["Access-Control-Allow-Methods"] == allow
    status, headers, _ = served.request("PUT", "/v1/pixel.gif")
    assert (status, headers["Allow"]) == (405, "GET, OPTIONS")


def test_responses_to_an_allowed_origin_carry_its_cors_headers(served: Meteorit, redis: redislib.Redis) -> None:
    ok = post(served, '{"type":"a"}', headers={"Origin": SHOP, "X-Api-Key": SECRET})
    refused = post(served, '{"kind":"a"}', headers={"Origin": SHOP, "X-Api-Key": SECRET})
    unauthorized = post(served, '{"type":"a"}', headers={"Origin": SHOP})
    for status, headers, _ in (ok, refused, unauthorized):
        assert headers["Access-Control-Allow-Origin"] == SHOP and headers["Vary"] == "Origin"
        assert headers["Access-Control-Expose-Headers"] == "Retry-After"  # a page reads it on 429/503
    assert [ok[0], refused[0], unauthorized[0]] == [202, 400, 401]
    assert len(queued(redis)) == 1


def test_a_secret_key_from_another_origin_is_served_without_cors_headers(served: Meteorit,
                                                                         redis: redislib.Redis) -> None:
    before = stats(served)["cors_refused"]
    status, headers, _ = post(served, '{"type":"a"}', headers={"Origin": "https://evil.example", "X-Api-Key": SECRET})
    assert status == 202 and cors_headers(headers) == {}  # a server's key: the browser withholds the answer
    counted(served, lambda t: t["cors_refused"], before + 1)
    status, headers, _ = post(served, '{"type":"a"}', headers={"X-Api-Key": SECRET})
    assert status == 202 and cors_headers(headers) == {}  # no Origin: not a browser's cross-origin call
    assert len(queued(redis)) == 2


# --- public keys


def test_a_public_key_in_the_query_or_a_header_and_never_in_the_record(served: Meteorit,
                                                                        redis: redislib.Redis) -> None:
    assert post(served, '{"type":"q"}', f"/v1/events?key={PUBLIC}", {"Origin": SHOP})[0] == 202
    assert post(served, '{"type":"h"}', headers={"X-Api-Key": PUBLIC})[0] == 202
    assert post(served, '{"type":"b"}', headers={"Authorization": f"Bearer {PUBLIC}"})[0] == 202
    raw = b"".join(redis.lrange(QUEUE, 0, -1))
    assert [e["type"] for e in queued(redis)] == ["q", "h", "b"]
    assert PUBLIC.encode() not in raw and b"key" not in raw
    assert PUBLIC not in served.log_path.read_text() and SECRET not in served.log_path.read_text()


def test_a_secret_key_in_the_query_string_is_refused(served: Meteorit, redis: redislib.Redis) -> None:
    status, _, reply = post(served, '{"type":"a"}', f"/v1/events?key={SECRET}")
    assert status == 401 and "header" in reply["error"]
    assert post(served, '{"type":"a"}', "/v1/events?key=nope")[0] == 401
    assert post(served, '{"type":"a"}', "/v1/events?key=%zz")[0] == 400
    assert redis.llen(QUEUE) == 0


def test_a_public_key_from_an_origin_not_listed_is_403(served: Meteorit, redis: redislib.Redis) -> None:
    before = stats(served)["events_rejected"].get("forbidden", 0)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": "https://evil.example", "X-Api-Key": PUBLIC}):
        status, got, reply = post(served, '{"type":"a"}', f"/v1/events?key={PUBLIC}", headers)
        assert status == 403 and "origin" in reply["error"] and cors_headers(got) == {}
    assert redis.llen(QUEUE) == 0
    counted(served, lambda t: t["events_rejected"]["forbidden"], before + 3)


def test_restrict_public_keys_off_lets_any_origin_use_them(meteorit_factory: Callable[..., Meteorit],
                                                             redis: redislib.Redis, redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url},
                          "auth": {"public_keys": [PUBLIC], "restrict_public_keys": False}})
    status, headers, _ = post(m, '{"type":"a"}', f"/v1/events?key={PUBLIC}", {"Origin": "https://any.example"})
    assert status == 202 and cors_headers(headers) == {}  # no CORS configured: no CORS headers at all
    assert post(m, '{"type":"a"}')[0] == 401  # public keys alone turn auth on
    assert redis.llen(QUEUE) == 1


# --- the pixel


def pixel(m: Meteorit, query: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return m.request("GET", f"/v1/pixel.gif?{query}", headers=headers)


def test_the_pixel_queues_one_event_from_the_query_string(served: Meteorit, redis: redislib.Redis) -> None:
    status, headers, body = pixel(served, f"key={PUBLIC}&type=open&campaign=spring%20sale&n=3&id=mail-42",
                                  {"User-Agent": "MailClient/1.0"})
    assert status == 200 and body.startswith(GIF_MAGIC) and len(body) == 43
    assert headers["Content-Type"] == "image/gif" and headers["Cache-Control"] == "no-store"
    assert headers["X-Meteorit-Outcome"] == "accepted"
    [event] = queued(redis)
    assert {k: event[k] for k in ("type", "campaign", "n", "id")} == {
        "type": "open", "campaign": "spring sale", "n": "3", "id": "mail-42"}  # every value a string
    assert "key" not in event and PUBLIC not in json.dumps(event)
    assert event["context"] == {"ip": "127.0.0.1", "user_agent": "MailClient/1.0"}


@pytest.mark.parametrize(("query", "outcome"), [
    (f"key={PUBLIC}&campaign=spring", "invalid"),  # no type
    (f"key={PUBLIC}&type=", "invalid"),
    (f"key={PUBLIC}&type=open&name=%C3%28", "invalid"),  # not UTF-8
    (f"key={PUBLIC}&type=open&name=%G1", "invalid"),  # bad percent-encoding
    (f"key={PUBLIC}&type=open&type=click", "invalid"),
    ("type=open", "unauthorized"),
    ("key=wrong&type=open", "unauthorized"),
    (f"key={SECRET}&type=open", "unauthorized"),  # a secret key in a URL
    (f"key={PUBLIC}&type=open&" + "&".join(f"p{i}=1" for i in range(70)), "too_large"),  # over 64 parameters
    (f"key={PUBLIC}&type=open&context=mine", "invalid"),  # events.context adds one: it must be an object
])
def test_a_refused_pixel_still_answers_the_gif_and_counts_why(served: Meteorit, redis: redislib.Redis,
                                                              query: str, outcome: str) -> None:
    before = stats(served).get("pixel_requests", {}).get(outcome, 0)
    status, headers, body = pixel(served, query)
    assert status == 200 and body.startswith(GIF_MAGIC)
    assert headers["X-Meteorit-Outcome"] == outcome
    assert redis.llen(QUEUE) == 0
    counted(served, lambda t: t["pixel_requests"][outcome], before + 1)


def test_the_pixel_answers_once_redis_has_the_event_and_a_key_rate_applies(
        meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis, redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "auth": {"public_keys": [PUBLIC]},
                          "limits": {"key_rate": 1, "key_burst": 1}})
    outcomes = [pixel(m, f"key={PUBLIC}&type=open&n={n}")[1]["X-Meteorit-Outcome"] for n in range(6)]
    assert set(outcomes) == {"accepted", "rate_limited"}
    # each GIF marked accepted came after Redis had its event
    assert redis.llen(QUEUE) == outcomes.count("accepted")
    counted(m, lambda t: t["pixel_requests"], {k: outcomes.count(k) for k in set(outcomes)})


# --- compressed bodies

EVENTS = [{"type": "pageview", "n": n, "url": "https://shop.example/p/" + "x" * 40} for n in range(50)]


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("encoding", "pack"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate), ("x-gzip", gzip.compress),
])
def test_a_compressed_body_is_accepted_whole(served: Meteorit, redis: redislib.Redis, encoding: str,
                                             pack: Callable[[bytes], bytes]) -> None:
    body = pack(json.dumps(EVENTS).encode())
    status, _, reply = post(served, body, headers={"X-Api-Key": SECRET, "Content-Encoding": encoding})
    assert (status, reply) == (202, {"accepted": 50})
    assert [e["n"] for e in queued(redis)] == list(range(50))
    ndjson = gzip.compress(b"\n".join(json.dumps(e).encode() for e in EVENTS[:3]))
    status, _, reply = post(served, ndjson, headers={"X-Api-Key": SECRET, "Content-Encoding": "gzip",
                                                     "Content-Type": "application/x-ndjson"})
    assert (status, reply) == (202, {"accepted": 3})


def test_bad_compressed_bodies_are_refused_whole(served: Meteorit, redis: redislib.Redis) -> None:
    good = gzip.compress(json.dumps(EVENTS).encode())
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for body, encoding, expected in (
            (good[:len(good) // 2], "gzip", 400),  # truncated
            (bytes(flipped), "gzip", 400),  # corrupt
            (b"\x1f\x8b" + b"\x00" * 30, "gzip", 400),
            (zlib.compress(b"[{]"), "deflate", 400),  # inflates, but not to JSON
            (good + good, "gzip", 400),  # a second stream after the first
            (good, "br", 415),
            (good, "gzip, identity", 415)):
        status, _, reply = post(served, body, headers={"X-Api-Key": SECRET, "Content-Encoding": encoding})
        assert status == expected and reply["error"], (encoding, body[:10])
    assert redis.llen(QUEUE) == 0


def test_a_small_body_that_inflates_past_max_body_is_413(served: Meteorit, redis: redislib.Redis) -> None:
    packed = bomb(128)  # 128 MiB of zeros in about 128 KiB: over max_body even compressed here
    status, _, _ = post(served, packed, headers={"X-Api-Key": SECRET, "Content-Encoding": "gzip"})
    assert status == 413
    small = gzip.compress(b"[" + b" " * (MAX_BODY * 4) + b"]")  # 256 KiB of JSON in a few hundred bytes
    assert len(small) < 1024
    status, _, reply = post(served, small, headers={"X-Api-Key": SECRET, "Content-Encoding": "gzip"})
    assert status == 413 and "inflates past" in reply["error"]
    exactly = gzip.compress(json.dumps({"type": "a", "pad": ""}).encode().ljust(MAX_BODY))
    assert post(served, exactly, headers={"X-Api-Key": SECRET, "Content-Encoding": "gzip"})[0] == 202
    assert redis.llen(QUEUE) == 1
    counted(served, lambda t: t["events_rejected"]["too_large"] >= 2, True)


# --- request context


def test_context_is_the_peer_without_trusted_proxies(served: Meteorit, redis: redislib.Redis) -> None:
    headers = {"X-Api-Key": SECRET, "Origin": SHOP, "Referer": SHOP + "/cart", "User-Agent": "Browser/1.0",
               "X-Forwarded-For": "6.6.6.6"}
    assert post(served, '[{"type":"a"},{"type":"b","context":{"page":"/cart","ip":"6.6.6.6"}}]',
                headers=headers)[0] == 202
    first, second = queued(redis)
    assert first["context"] == {"ip": "127.0.0.1", "user_agent": "Browser/1.0", "referer": SHOP + "/cart",
                                "origin": SHOP}
    assert second["context"] == {**first["context"], "page": "/cart"}  # the client's kept, its ip not
    assert post(served, '{"type":"a","context":[1]}', headers=headers)[0] == 400


def test_context_believes_x_forwarded_for_from_a_trusted_proxy(
        meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis, redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "events": {"context": ["ip"]},
                          "server": {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}})
    # two lines of X-Forwarded-For make one list: the client wrote the first, our proxies the rest
    raw = (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 198.51.100.7, 10.0.0.3\r\n"
           b"Content-Length: 12\r\nConnection: close\r\n\r\n{\"type\":\"a\"}")
    import socket
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(raw)
        assert s.recv(65536).startswith(b"HTTP/1.1 202 ")
    assert post(m, '{"type":"b"}')[0] == 202  # no X-Forwarded-For: the proxy itself
    assert [e["context"] for e in queued(redis)] == [{"ip": "198.51.100.7"}, {"ip": "127.0.0.1"}]


def test_no_context_unless_configured(meteorit: Meteorit, redis: redislib.Redis) -> None:
    assert meteorit.post({"type": "a"}, headers={"User-Agent": "x", "Origin": SHOP})[0] == 202
    assert "context" not in queued(redis)[0]


# --- the snippet


def test_the_snippet_is_served_with_an_etag_and_revalidates(served: Meteorit) -> None:
    status, headers, body = served.request("GET", "/v1/meteorit.js")
    assert status == 200 and body == SNIPPET.read_bytes()
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "max-age=" in headers["Cache-Control"] and int(headers["Cache-Control"].split("max-age=")[1]) >= 3600
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    for tag in (etag, f"W/{etag}", f'"other", {etag}'):
        status, headers, body = served.request("GET", "/v1/meteorit.js", headers={"If-None-Match": tag})
        assert (status, body, headers["ETag"]) == (304, b"", etag)
        assert "Content-Length" not in headers
    assert served.request("GET", "/v1/meteorit.js", headers={"If-None-Match": '"old"'})[0] == 200
    # every worker serves the same bytes under the same tag
    assert {served.request("GET", "/v1/meteorit.js")[1]["ETag"] for _ in range(6)} == {etag}


# --- hot reload and counters


def test_cors_settings_apply_on_a_hot_reload(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                                             redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}})
    pids = set(m.worker_pids().values())
    status, headers, _ = m.request("OPTIONS", "/v1/events", headers={"Origin": SHOP})
    assert status == 403 and cors_headers(headers) == {}  # default: no CORS at all
    rewrite(m, http={"cors_origins": [SHOP]}, events={"context": ["user_agent"]})
    done = m.ctl("reload")
    assert done.returncode == 0, done.stderr
    for _ in range(6):  # both workers
        status, headers, _ = m.request("OPTIONS", "/v1/events", headers={"Origin": SHOP})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == SHOP
        assert m.post({"type": "a"}, headers={"User-Agent": "after-reload"})[0] == 202
    assert {e["context"]["user_agent"] for e in queued(redis)} == {"after-reload"}
    assert set(m.worker_pids().values()) == pids  # hot: no worker replaced


def test_the_new_counters_are_in_metrics(served: Meteorit) -> None:
    pixel(served, "type=open")  # unauthorized
    served.request("OPTIONS", "/v1/events", headers={"Origin": "https://evil.example"})
    status, _, body = served.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert "# TYPE meteorit_cors_refused_total counter" in text
    # per worker, as Prometheus wants it: no unlabeled total beside the series
    wait_until(lambda: re.search(r'^meteorit_pixel_requests_total\{outcome="unauthorized",worker="\d+"\} [1-9]',
                                 served.request("GET", "/metrics")[2].decode(), re.M), 5, "the pixel in /metrics")
    wait_until(lambda: re.search(r'^meteorit_events_rejected_total\{reason="unauthorized",worker="\d+"\} [1-9]',
                                 served.request("GET", "/metrics")[2].decode(), re.M), 5, "the refusal in /metrics")


@pytest.mark.parametrize(("auth", "warned"), [
    ({}, True),
    ({"public_keys": ["pk_site"]}, False),
    ({"keys": ["s3cret"]}, False),
])
def test_the_master_warns_that_auth_is_off_only_without_any_key(
        meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
        auth: dict[str, Any], warned: bool) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "server": {"workers": 1}, "auth": auth})
    warnings = [e["msg"] for e in m.logs() if e["msg"].startswith("AUTH IS OFF")]
    assert warnings == (["AUTH IS OFF: auth.keys and auth.public_keys are empty, anyone who reaches "
                         "the port can post events"] if warned else [])
