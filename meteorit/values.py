"""Setting values: the grammar of each kind of value a setting takes.

Owns: the parsers config.SETTINGS declares (each takes the raw value from the file, the
environment or a flag, and returns it checked or raises ValueError with the reason), and
the grammars other parts read values with (listen addresses, sink URLs, SQL names).
Must not touch: files, sockets, processes; must not import any part of meteorit.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs

from redis.connection import parse_url as parse_redis_url

EMBEDDED = "embedded"  # redis.url: the master starts and supervises a private redis-server
EMBEDDED = "embedded"
REDIS_MODES = ("single", "cluster", "sentinel")
MAX_SHARDS = 1024  # a list per shard; more would only spread the queue thinner than slots help
MAX_NODES = 64  # seed nodes or sentinels: a few are enough, the client learns the rest
SQLITE_TIMEOUT = 5.0  # seconds a SQLite sink waits for another process's write lock
SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
KiB = 1024
MiB = 1024 * KiB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
# An entry of http.cors_origins: scheme://host[:port], the host optionally "*." + a domain
# (its subdomains); lowercase, as browsers write the Origin header. No path, no slash.
_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://(\*\.)?([a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$")
# What events.context may add to each record (meteorit.worker.context fills them in).
CONTEXT_FIELDS = ("ip", "user_agent", "referer", "origin")
UNIX_PEER = "unix"  # in server.trusted_proxies: a peer on a unix socket (a proxy on this host)
_SIZE_UNITS = {None: 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB,
               "m": MiB, "mb": MiB, "mib": MiB, "g": 1024 * MiB, "gb": 1024 * MiB, "gib": 1024 * MiB}


# --- value parsers: each takes the raw value and returns it checked, or raises ValueError


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return value


def positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:  # nan too
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return float(value)


def size(value: Any) -> int:
    """A byte count: an integer, or a string such as "64KiB" or "1MiB"."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"must be a size such as 65536, \"64KiB\" or \"1MiB\", got {value!r}")
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2) and match.group(2).lower()]
    return positive_int(value)


def str_value(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def non_empty_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def listen_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of addresses such as \"127.0.0.1:8080\"")
    for address in value:
        parse_listen_address(address)
    return list(value)


def parse_listen_address(address: Any) -> tuple[str, Any]:
    """`HOST:PORT`, `[V6]:PORT` or `unix:/path` → (family, address)."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"bad listen address {address!r}")
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"bad listen address {address!r}: empty unix socket path")
        return "unix", path
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad listen address {address!r}: expected HOST:PORT, [V6]:PORT or unix:/path")
    if host.startswith("[") and host.endswith("]"):
        return "inet6", (host[1:-1], int(port))
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"bad listen address {address!r}: write an IPv6 address as [V6]:PORT")
    return "inet", (host or "0.0.0.0", int(port))


def redis_url(value: Any) -> str:
    value = non_empty_str(value)
    if value == EMBEDDED:
        return value
    if value.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be \"embedded\" or a redis://, rediss:// or unix:// URL, got {value!r}")
    try:
        parse_redis_url(value)  # the parser the workers will use, so -t catches what they would
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {value!r}: {exc}") from None
    return value


def parse_redis_node(text: Any) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` of a cluster node or a sentinel -> (host, port)."""
    if not isinstance(text, str):
        raise ValueError(f"a node must be a \"HOST:PORT\" string, got {text!r}")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad node {text!r}: write an IPv6 address as [V6]:PORT")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"bad node {text!r}: expected HOST:PORT")
    return host, int(port)


def redis_nodes(value: Any) -> list[str]:
    """Seed nodes of a cluster or the sentinels: a list of "HOST:PORT" (or one string, comma
    separated, as an environment variable gives it)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise ValueError(f"must be a list of at most {MAX_NODES} \"HOST:PORT\" strings")
    for node in value:
        parse_redis_node(node)
    return list(value)


def shard_count(value: Any) -> int:
    value = positive_int(value)
    if value > MAX_SHARDS:
        raise ValueError(f"must be at most {MAX_SHARDS}, got {value}")
    return value


def api_keys(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise ValueError("must be a list of non-empty strings")
    return list(value)


def cors_origins(value: Any) -> list[str]:
    """Origins allowed to call the browser endpoints: "*", "https://shop.example[:port]" or
    "https://*.shop.example[:port]"; lowercased, as browsers send them."""
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ValueError("must be a list of origins such as \"https://shop.example\"")
    origins = []
    for origin in value:
        if origin != "*" and not _ORIGIN_RE.match(origin.lower()):
            raise ValueError(f"{origin!r} is not an origin: write \"https://shop.example\" (scheme, host, "
                             "optional port; no path or trailing slash), \"https://*.shop.example\" for "
                             "its subdomains, or \"*\" for any origin")
        origins.append(origin.lower())
    return origins


def context_fields(value: Any) -> list[str]:
    if (not isinstance(value, list) or not all(f in CONTEXT_FIELDS for f in value)
            or len(set(value)) != len(value)):
        raise ValueError(f"must be a list of distinct names among {', '.join(CONTEXT_FIELDS)}, got {value!r}")
    return list(value)


def cidr_list(value: Any) -> list[str]:
    """Networks such as "10.0.0.0/8", "::1" (one address) or "unix" (peers on a unix socket)."""
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError("must be a list of networks such as \"10.0.0.0/8\" or \"unix\"")
    for network in value:
        if network != UNIX_PEER:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network such as \"10.0.0.0/8\", "
                                 "\"fd00::/8\", \"127.0.0.1\" or \"unix\"") from None
    return list(value)


def module_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(
            isinstance(m, str) and all(part.isidentifier() for part in m.split(".")) for m in value):
        raise ValueError("must be a list of importable module names such as \"mycompany.alerts\"")
    return list(value)


@dataclass(frozen=True)
class SinkUrl:
    """A checked `consumer.sink`; the consumer opens its sink from this."""

    kind: str  # "sqlite", "postgresql" or "ndjson"
    target: str  # a path, a DSN, or "-"
    timeout: float = SQLITE_TIMEOUT


def parse_sink_url(url: str) -> SinkUrl:
    """Check a sink URL; ValueError names what is wrong. The grammar of a setting, so it is
    declared here: `meteorit -t` checks it without importing the consumer."""
    if url.startswith("sqlite:///"):
        path, _, query = url[len("sqlite:///"):].partition("?")
        if not path:
            raise ValueError(f"no database path in {url!r} (sqlite:///relative.db or sqlite:////abs.db)")
        params = parse_qs(query, strict_parsing=bool(query)) if query else {}
        unknown = set(params) - {"timeout"}
        if unknown:
            raise ValueError(f"unknown sqlite parameter {sorted(unknown)[0]!r} (known: timeout)")
        timeout = SQLITE_TIMEOUT
        if "timeout" in params:
            try:
                timeout = float(params["timeout"][-1])
            except ValueError:
                raise ValueError(f"timeout must be a number of seconds in {url!r}") from None
            if not timeout >= 0:
                raise ValueError(f"timeout must be >= 0 in {url!r}")
        return SinkUrl("sqlite", path, timeout)
    if url.startswith(("postgresql://", "postgres://")):
        return SinkUrl("postgresql", url)
    if url.startswith("ndjson:"):
        target = url[len("ndjson:"):]
        if not target:
            raise ValueError("ndjson needs a path or - (stdout): ndjson:/var/events.ndjson")
        return SinkUrl("ndjson", target)
    raise ValueError(f"unknown sink {url!r}: use sqlite:///PATH, postgresql://..., ndjson:PATH or ndjson:-")


def check_table(name: str) -> str:
    """A table name goes into SQL text (no database binds identifiers): a plain identifier only."""
    if not SQL_IDENTIFIER.match(name):
        raise ValueError(f"must be a plain SQL identifier (letters, digits, _), got {name!r}")
    return name


def sink_url(value: Any) -> str:
    """A meteorit-consumer sink: sqlite:///PATH, postgresql://..., ndjson:PATH or ndjson:-."""
    parse_sink_url(non_empty_str(value))
    return value


def sql_table(value: Any) -> str:
    return check_table(non_empty_str(value))


def consumer_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64 or any(c.isspace() for c in value):
        raise ValueError(f"must be a string of at most 64 characters without spaces, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return parse

