"""CORS origins: the config's grammar (a clear error for the usual mistakes) and the matching
of Origin headers: exact, subdomain wildcards, "*", and nothing echoed that a browser would
not send."""

from __future__ import annotations

import pytest

from meteorit import config, values
from meteorit.errors import ConfigError
from meteorit.worker.cors import ALLOWED_HEADERS, CorsPolicy


def policy(*origins: str) -> CorsPolicy:
    return CorsPolicy(values.cors_origins(list(origins)))


@pytest.mark.parametrize("entry", [
    "https://shop.example/", "https://shop.example/path", "shop.example", "*.shop.example",
    "https://", "https://*", "https://a.*.example", "https://shop.example:port", "", 42,
])
def test_the_config_refuses_what_is_not_an_origin(entry: object) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(env={}, overrides={"http.cors_origins": [entry]})
    assert refused.value.key == "http.cors_origins"


def test_the_config_lowercases_origins() -> None:
    cfg = config.load(env={}, overrides={"http.cors_origins": ["HTTPS://Shop.Example:8443", "*"]})
    assert cfg.http.cors_origins == ["https://shop.example:8443", "*"]


def test_an_empty_list_enables_nothing() -> None:
    cors = policy()
    assert not cors.enabled
    assert not cors.allows(b"https://shop.example")


def test_exact_origins_match_scheme_host_and_port() -> None:
    cors = policy("https://shop.example", "http://localhost:8080")
    assert cors.enabled
    assert cors.allows(b"https://shop.example")
    assert cors.allows(b"https://SHOP.example")  # hosts are case-insensitive
    assert cors.allows(b"http://localhost:8080")
    for other in (b"http://shop.example", b"https://shop.example:444", b"https://www.shop.example",
                  b"https://shop.example.evil", b"https://evilshop.example", b"http://localhost:8081",
                  b"http://localhost", b"null", b""):
        assert not cors.allows(other), other


def test_a_wildcard_matches_subdomains_only() -> None:
    cors = policy("https://*.shop.example")
    assert cors.allows(b"https://www.shop.example")
    assert cors.allows(b"https://a.b.shop.example")
    for other in (b"https://shop.example", b"http://www.shop.example", b"https://www.shop.example:8443",
                  b"https://evilshop.example", b"https://www.shop.example.evil", b"https://.shop.example",
                  b"https://a/b.shop.example", b"https://a b.shop.example", b"https://a\r\nX: y.shop.example"):
        assert not cors.allows(other), other


def test_a_wildcard_with_a_port() -> None:
    cors = policy("http://*.shop.test:8080")
    assert cors.allows(b"http://app.shop.test:8080")
    assert not cors.allows(b"http://app.shop.test")
    assert not cors.allows(b"http://app.shop.test:80801")


def test_star_allows_any_well_formed_origin_but_echoes_no_garbage() -> None:
    cors = policy("*")
    assert cors.allows(b"https://anything.example") and cors.allows(b"http://127.0.0.1:9")
    assert cors.allows(b"null")  # sandboxed frames and file: pages send it
    for garbage in (b"https://a.example\r\nSet-Cookie: x=1", b"https://a.example/path", b"not an origin", b""):
        assert not cors.allows(garbage), garbage


def test_the_headers_echo_the_origin_never_a_star_and_never_credentials() -> None:
    response = CorsPolicy.response_headers(b"https://shop.example").decode()
    assert "Access-Control-Allow-Origin: https://shop.example\r\n" in response
    assert "Vary: Origin\r\n" in response and "Access-Control-Expose-Headers: Retry-After\r\n" in response
    preflight = CorsPolicy.preflight_headers(b"https://shop.example", b"POST, OPTIONS").decode()
    assert "Access-Control-Allow-Methods: POST, OPTIONS\r\n" in preflight
    assert f"Access-Control-Allow-Headers: {ALLOWED_HEADERS.decode()}\r\n" in preflight
    for name in ("Content-Type", "Authorization", "X-Api-Key", "Content-Encoding"):
        assert name in ALLOWED_HEADERS.decode()
    assert "Access-Control-Max-Age: " in preflight and "Vary: Origin\r\n" in preflight
    assert "Credentials" not in response + preflight
