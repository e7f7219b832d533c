"""Request context: the fields configured and no more, values capped, the client's IP behind
trusted proxies (read from the right of X-Forwarded-For, never a value the client wrote
itself), and a client's own `context` object kept under the server's values."""

from __future__ import annotations

import pytest

from meteorit import config
from meteorit.errors import ConfigError, EventError
from meteorit.worker.context import CAPS, MAX_HOPS, RequestContext, attach

UA = b"Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0"


def test_only_the_configured_fields_and_only_with_a_value() -> None:
    headers = {b"user-agent": UA, b"referer": b"https://shop.example/cart", b"origin": b"https://shop.example"}
    assert RequestContext(["user_agent"], []).build("10.1.2.3", headers) == {"user_agent": UA.decode()}
    full = RequestContext(["ip", "user_agent", "referer", "origin"], []).build("10.1.2.3", headers)
    assert full == {"ip": "10.1.2.3", "user_agent": UA.decode(), "referer": "https://shop.example/cart",
                    "origin": "https://shop.example"}
    assert RequestContext(["referer", "origin"], []).build("10.1.2.3", {}) == {}


def test_values_are_capped() -> None:
    headers = {b"user-agent": b"u" * 10000, b"referer": b"r" * 10000, b"origin": b"o" * 10000}
    built = RequestContext(["user_agent", "referer", "origin"], []).build(None, headers)
    assert {k: len(v) for k, v in built.items()} == {k: CAPS[k] for k in ("user_agent", "referer", "origin")}


def test_bytes_that_are_not_utf8_do_not_fail_the_request() -> None:
    assert RequestContext(["user_agent"], []).build(None, {b"user-agent": b"a\xffb"}) == {"user_agent": "a\ufffdb"}


def test_the_headers_the_http_layer_must_keep() -> None:
    assert RequestContext(["ip"], []).headers_needed == frozenset()  # no proxy: X-Forwarded-For is ignored
    assert RequestContext(["ip"], ["10.0.0.0/8"]).headers_needed == {b"x-forwarded-for"}
    assert RequestContext(["user_agent", "referer"], []).headers_needed == {b"user-agent", b"referer"}


PROXY = "10.0.0.5"


@pytest.mark.parametrize(("peer", "forwarded", "ip"), [
    ("203.0.113.9", None, "203.0.113.9"),  # no proxy in between
    ("203.0.113.9", b"1.2.3.4", "203.0.113.9"),  # an untrusted peer's X-Forwarded-For is its own story
    (PROXY, None, PROXY),  # a proxy that did not say: the proxy
    (PROXY, b"198.51.100.7", "198.51.100.7"),
    (PROXY, b"6.6.6.6, 198.51.100.7", "198.51.100.7"),  # the client wrote 6.6.6.6 itself
    (PROXY, b"6.6.6.6, 198.51.100.7, 10.0.0.9", "198.51.100.7"),  # two proxies of ours
    (PROXY, b"10.0.0.8, 10.0.0.9", "10.0.0.8"),  # all ours: the furthest
    (PROXY, b"198.51.100.7, junk", PROXY),  # a hop that is no address: the last one known
    (PROXY, b"2001:db8::1", "2001:db8::1"),
    (PROXY, b"::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped, as IPv4
    ("::ffff:10.0.0.5", b"198.51.100.7", "198.51.100.7"),  # a proxy seen on a dual-stack socket
])
def test_the_client_ip_behind_trusted_proxies(peer: str, forwarded: bytes | None, ip: str) -> None:
    headers = {} if forwarded is None else {b"x-forwarded-for": forwarded}
    assert RequestContext(["ip"], ["10.0.0.0/8"]).build(peer, headers) == {"ip": ip}


def test_without_trusted_proxies_forwarded_for_is_never_believed() -> None:
    assert RequestContext(["ip"], []).build(PROXY, {b"x-forwarded-for": b"198.51.100.7"}) == {"ip": PROXY}


def test_a_unix_socket_peer_is_a_proxy_only_when_trusted() -> None:
    headers = {b"x-forwarded-for": b"198.51.100.7"}
    assert RequestContext(["ip"], []).build(None, headers) == {}
    assert RequestContext(["ip"], ["unix"]).build(None, headers) == {"ip": "198.51.100.7"}
    assert RequestContext(["ip"], ["unix"]).build(None, {}) == {}


def test_the_walk_stops_after_max_hops() -> None:
    chain = b", ".join([b"198.51.100.7"] + [b"10.0.0.1"] * (MAX_HOPS + 5))
    assert RequestContext(["ip"], ["10.0.0.0/8"]).build(PROXY, {b"x-forwarded-for": chain}) == {"ip": "10.0.0.1"}


def test_attach_sets_merges_or_refuses() -> None:
    events = [{"type": "a"}, {"type": "b", "context": {"page": "/x", "ip": "6.6.6.6"}}]
    attach(events, {"ip": "198.51.100.7"})
    assert events[0]["context"] == {"ip": "198.51.100.7"}
    assert events[1]["context"] == {"page": "/x", "ip": "198.51.100.7"}  # the server's ip wins
    with pytest.raises(EventError) as refused:
        attach([{"type": "a"}, {"type": "b", "context": "mine"}], {"ip": "1.2.3.4"})
    assert refused.value.status == 400 and refused.value.index == 1


@pytest.mark.parametrize(("key", "value"), [
    ("events.context", ["ip", "cookie"]), ("events.context", ["ip", "ip"]), ("events.context", "ip"),
    ("server.trusted_proxies", ["10.0.0.0/33"]), ("server.trusted_proxies", ["proxy.example"]),
    ("server.trusted_proxies", "10.0.0.0/8"),
])
def test_the_config_names_a_bad_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(env={}, overrides={key: value})
    assert refused.value.key == key


def test_the_config_takes_networks_and_unix() -> None:
    cfg = config.load(env={}, overrides={"server.trusted_proxies": ["10.0.0.0/8", "fd00::/8", "127.0.0.1", "unix"],
                                         "events.context": ["ip", "origin"]})
    assert cfg.server.trusted_proxies == ["10.0.0.0/8", "fd00::/8", "127.0.0.1", "unix"]
    assert cfg.events.context == ["ip", "origin"]
