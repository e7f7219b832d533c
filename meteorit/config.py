"""Settings: one declaration per setting drives the TOML file, the environment, the
command-line overrides, validation and the reference in the README.

Owns: reading `meteorit.toml` (tomllib), checking every key, and producing a `Config`.
Must not touch: sockets, processes or Redis; it only describes what they should be.

Precedence, highest first: command-line flags, environment (`METEORIT_*`), the file,
the defaults below.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .values import (EMBEDDED, REDIS_MODES, SQLITE_TIMEOUT, api_keys, boolean, check_table, cidr_list, consumer_name, context_fields, cors_origins, KiB, listen_list, MiB, module_list, non_empty_str, non_negative_int, one_of, parse_listen_address, parse_redis_node, parse_sink_url, positive_int, positive_seconds, redis_nodes, redis_url, shard_count, sink_url, SinkUrl, size, sql_table, str_value)

# The grammar of values lives in values.py; these are named here too for the modules that
# read a setting's grammar through config (the listeners, the consumer's sinks).
__all__ = ["Config", "Setting", "SETTINGS", "ConfigError", "load", "reload", "reload_plan",
           "reference_markdown", "embedded_redis_url", "EMBEDDED", "EMBEDDED_SOCKET", "SPOOL_FRAMING",
           "KiB", "MiB", "SQLITE_TIMEOUT", "SinkUrl", "check_table", "parse_listen_address", "parse_redis_node",
           "parse_sink_url", "size", "SINGLE", "CLUSTER", "SENTINEL"]
SINGLE, CLUSTER, SENTINEL = REDIS_MODES

# What the spool's file format adds around one request (file header 20 + record header 12
# + msgpack array32 5 bytes): declared here so config needs no import of the spool, and
# tests/test_spool_format.py checks that the format adds up to it.
SPOOL_FRAMING = 37
EMBEDDED_SOCKET = "redis.sock"  # in redis.data_dir
# What a reload does when a setting changed (see `reload_plan`):
HOT = "hot"  # sent to the running workers, applied between requests
REPLACE = "replace"  # workers are replaced one at a time (new one ready, then old one QUIT)
RESTART = "restart"  # cannot change while running: the reload is refused


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    env: str | None = None
    reload: str = REPLACE

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "listen", ["127.0.0.1:8080"], listen_list,
            "Addresses to listen on: \"HOST:PORT\", \"[V6]:PORT\" or \"unix:/path\".", "METEORIT_LISTEN"),
    Setting("server", "workers", 0, non_negative_int,
            "Worker processes; 0 means one per CPU.", "METEORIT_WORKERS"),
    Setting("server", "reuseport", True, boolean,
            "One SO_REUSEPORT socket per worker, so the kernel spreads connections evenly; false: one shared socket.", reload=RESTART),
    Setting("server", "backlog", 2048, positive_int, "listen() backlog of each socket.", reload=RESTART),
    Setting("server", "max_workers", 32, positive_int,
            "Most workers TTIN may grow to; one IPC pipe per slot is made at start.", reload=RESTART),
    Setting("server", "plugins", [], module_list,
            "Python modules each worker imports after boot, e.g. to add alert handlers with ipc.receive."),
    Setting("server", "graceful_timeout", 30.0, positive_seconds,
            "QUIT: how long workers may take to finish in-flight requests and flush."),
    Setting("server", "user", "", str_value, "When started as root: run the workers and the embedded Redis "
            "as this user (the master binds first, then they drop root); empty: no change.", reload=RESTART),
    Setting("server", "group", "", str_value, "Their group, with server.user; empty: the user's own group.",
            reload=RESTART),
    Setting("server", "pid_file", "", str_value,
            "Write the master's pid to this file, removed at exit; empty: no pid file.", reload=RESTART),
    Setting("server", "trusted_proxies", [], cidr_list,
            "Proxies whose X-Forwarded-For is believed for the `ip` of events.context: networks such as "
            "\"10.0.0.0/8\", or \"unix\" for a proxy on a unix socket; empty: the ip is the peer's.",
            reload=HOT),
    Setting("redis", "mode", "single", one_of(*REDIS_MODES),
            "\"single\": one Redis at redis.url; \"cluster\": a Redis Cluster found from redis.nodes, the "
            "queue split in redis.shards lists; \"sentinel\": the primary the sentinels in redis.nodes name "
            "redis.sentinel_master.", reload=RESTART),
    Setting("redis", "url", EMBEDDED, redis_url,
            "Single mode: \"embedded\" (a private redis-server the master supervises) or a redis:// / "
            "rediss:// / unix:// URL.", "METEORIT_REDIS_URL"),
    Setting("redis", "nodes", [], redis_nodes,
            "Cluster mode: a few of the cluster's nodes, \"HOST:PORT\" (the client learns the rest); "
            "sentinel mode: the sentinels.", "METEORIT_REDIS_NODES"),
    Setting("redis", "sentinel_master", "", str_value,
            "Sentinel mode: the name the sentinels monitor the primary under."),
    Setting("redis", "username", "", str_value,
            "Cluster and sentinel modes: the ACL user of the data nodes (single mode: in redis.url)."),
    Setting("redis", "password", "", str_value,
            "Cluster and sentinel modes: the password of the data nodes (single mode: in redis.url); "
            "sentinels are asked without one."),
    Setting("redis", "tls", False, boolean,
            "Cluster and sentinel modes: TLS to every node and sentinel, checked against the system's "
            "CA store (single mode: a rediss:// URL)."),
    Setting("redis", "shards", 16, shard_count,
            "Cluster mode: the queue is this many lists, redis.queue + \":{0}\" ... \":{N-1}\", spread "
            "over the cluster's slots by their hash tag.", reload=RESTART),
    Setting("redis", "wait_replicas", 0, non_negative_int,
            "Above 0: a group commit is acknowledged only once WAIT confirms this many replicas have it "
            "(waiting at most redis.timeout); short of that its events go to the spool too. 0: the "
            "primary's acknowledgement is enough.", reload=HOT),
    Setting("redis", "queue", "meteorit:events", non_empty_str, "The Redis list events are pushed to.", reload=HOT),
    Setting("redis", "timeout", 5.0, positive_seconds, "Connect and command timeout towards Redis."),
    Setting("redis", "batch_max_events", 10000, positive_int, "Most events in one group-commit RPUSH."),
    Setting("redis", "batch_max_bytes", "4MiB", size, "Most bytes in one group-commit RPUSH."),
    Setting("redis", "max_pending_bytes", "64MiB", size,
            "Most bytes of events a worker holds waiting for Redis; past it, new events go to the spool."),
    Setting("redis", "max_queue_length", 0, non_negative_int,
            "Above this many events in the queue (a stopped consumer), 503 until it drains; checked on "
            "each RPUSH reply and once a second, not per request. 0: no limit."),
    Setting("redis", "data_dir", "var/redis", non_empty_str,
            "Embedded Redis only: its data (AOF), socket and log; relative to the working directory.", reload=RESTART),
    Setting("redis", "server_binary", "redis-server", non_empty_str, "Embedded Redis only: the binary to run.", reload=RESTART),
    Setting("spool", "dir", "var/spool", non_empty_str,
            "Where each worker keeps its spool file for events Redis cannot take; relative to the "
            "working directory; one directory per meteorit instance.", reload=RESTART),
    Setting("spool", "fsync", "batch", one_of("always", "batch", "never"),
            "When a spooled request is answered: \"always\": after an fsync of its own record; \"batch\": "
            "after an fsync shared by the requests written together; \"never\": once written (no fsync)."),
    Setting("spool", "max_bytes", "256MiB", size,
            "Largest spool file of one worker; past it, with Redis unavailable, 503 with Retry-After."),
    Setting("spool", "redis_deadline", 2.0, positive_seconds,
            "An RPUSH not acknowledged within this goes to the spool (and so does everything until "
            "Redis answers); the late RPUSH may land too: duplicates, never losses."),
    Setting("auth", "keys", [], api_keys, "Accepted API keys, in a header only; with public_keys empty too, "
            "auth is off (logged loudly).", reload=HOT),
    Setting("auth", "public_keys", [], api_keys,
            "Write-only keys for web pages: in a header, or as the `key` query parameter (beacons, pixels, "
            "which cannot send headers). Never stored in a record or logged.", reload=HOT),
    Setting("auth", "restrict_public_keys", True, boolean,
            "A public key in a request whose Origin header is not in http.cors_origins gets 403 (requests "
            "without an Origin, such as an <img> pixel or a server, are not affected).", reload=HOT),
    Setting("limits", "max_body", "1MiB", size, "Largest request body; past it, 413.", reload=HOT),
    Setting("limits", "max_event_size", "64KiB", size,
            "Largest event, measured as its queue record (with id and received_at); past it, 413.", reload=HOT),
    Setting("limits", "max_events_per_request", 1000, positive_int, "Most events in one request; past it, 413.", reload=HOT),
    Setting("limits", "max_header_size", "16KiB", size, "Largest request line plus headers; past it, 431.", reload=HOT),
    Setting("limits", "max_headers", 100, positive_int, "Most header fields in one request; past it, 431.", reload=HOT),
    Setting("limits", "max_pipeline", 32, positive_int,
            "Most pipelined requests a connection may have waiting; reading pauses beyond.", reload=HOT),
    Setting("limits", "max_connections", 4096, positive_int, "Most open connections per worker; beyond, 503.", reload=HOT),
    Setting("limits", "max_buffered_bytes", "64MiB", size,
            "Most bytes of request bodies still arriving that a worker holds (a body that comes whole "
            "with its headers never counts); a new body that would pass it gets 503 with Retry-After, "
            "a chunked one pauses its connection until there is room.", reload=HOT),
    Setting("limits", "header_timeout", 10.0, positive_seconds,
            "From a request's first byte to the end of its headers; past it, 408.", reload=HOT),
    Setting("limits", "body_timeout", 30.0, positive_seconds, "From the end of the headers to the end of the body; past it, 408.", reload=HOT),
    Setting("limits", "keepalive_timeout", 75.0, positive_seconds, "An idle connection is closed after this.", reload=HOT),
    Setting("limits", "key_rate", 0, non_negative_int,
            "Events per second each API key may send, summed over all workers; past it, 429. 0: no limit.",
            reload=HOT),
    Setting("limits", "key_burst", 0, non_negative_int,
            "Events a key may send at once above its rate; 0: one second's worth of key_rate.", reload=HOT),
    Setting("http", "cors_origins", [], cors_origins,
            "Web page origins that may call the browser endpoints (CORS): \"https://shop.example\", "
            "\"https://*.shop.example\" (its subdomains) or \"*\"; empty: no CORS headers at all.", reload=HOT),
    Setting("events", "context", [], context_fields,
            "Adds a `context` object to each record with these request values: \"ip\" (see "
            "server.trusted_proxies), \"user_agent\", \"referer\", \"origin\"; empty: none.", reload=HOT),
    Setting("segment", "max_message_size", "32KiB", size,
            "Segment tracking API: largest message of a batch (as compact JSON), and largest body of a "
            "single call (/v1/track, ...); past it, 400, as Segment answers.", reload=HOT),
    Setting("segment", "max_batch_size", "500KiB", size,
            "Segment tracking API: largest body of a /v1/batch, once inflated; past it, 400. "
            "limits.max_body and limits.max_events_per_request apply too.", reload=HOT),
    Setting("control", "socket", "var/run/meteorit.sock", non_empty_str,
            "The master's Unix control socket, for meteoritctl; relative to the working directory.",
            reload=RESTART),
    Setting("control", "group", "", str_value,
            "A group whose members may use the control socket too (mode 0660); empty: 0600, the "
            "service's own user and root only.", reload=RESTART),
    Setting("log", "level", "info", one_of("debug", "info", "warning", "error"), "Log level.", reload=HOT),
    Setting("log", "format", "auto", one_of("auto", "json", "text"),
            "\"auto\": text when stderr is a terminal, else JSON (journald, log.file, pipes); \"json\": one "
            "object per line; \"text\" for humans.", reload=RESTART),
    Setting("log", "file", "", str_value,
            "Append logs to this file (USR1 reopens it, for logrotate); empty: stderr (journald).", reload=RESTART),
    # [consumer]: read by meteorit-consumer at its start; the master and workers ignore them
    Setting("consumer", "sink", "sqlite:///var/meteorit.db", sink_url,
            "Where meteorit-consumer stores events: \"sqlite:///PATH\" (relative; sqlite:////abs for an "
            "absolute path; ?timeout=S to wait for a lock), \"postgresql://...\", \"ndjson:PATH\", \"ndjson:-\".",
            reload=HOT),
    Setting("consumer", "table", "events", sql_table, "The table the consumer creates and fills.", reload=HOT),
    Setting("consumer", "batch", 10000, positive_int,
            "Most records the consumer takes from the queue in one atomic pop (and stores in one transaction).",
            reload=HOT),
    Setting("consumer", "concurrency", 4, positive_int,
            "Batches a consumer fetches and decodes ahead of the sink; the PostgreSQL sink also commits "
            "this many in parallel (SQLite and NDJSON: one at a time).", reload=HOT),
    Setting("consumer", "lease", 30.0, positive_seconds,
            "A consumer that stops renewing its lease for this long is gone: another consumer puts its "
            "in-flight batches back at the head of the queue.", reload=HOT),
    Setting("consumer", "dead_letter", "meteorit:dead", non_empty_str,
            "Redis list of the records the consumer cannot store, each with the reason.", reload=HOT),
    Setting("consumer", "name", "", consumer_name,
            "Names the consumer in its Redis keys and logs (plus pid and a random tag); empty: the host name.",
            reload=HOT),
    Setting("consumer", "stats_interval", 10.0, positive_seconds,
            "Seconds between the consumer's progress lines in the log (off a terminal).", reload=HOT),
)

SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_DEFAULTS = {s.name: s.parse(s.default) for s in SETTINGS}


@dataclass
class Config:
    """Validated settings, read as `config.limits.max_body`."""

    values: dict[str, Any]
    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given at start, kept on reload
    sections: dict[str, SimpleNamespace] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sections = {name: SimpleNamespace() for name in SECTIONS}
        for s in SETTINGS:
            setattr(self.sections[s.section], s.key, self.values[s.name])

    def __getattr__(self, name: str) -> SimpleNamespace:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    @property
    def version(self) -> str:
        """A short digest of the effective settings, the same in every process."""
        blob = repr(sorted(self.values.items())).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def worker_count(self) -> int:
        return self.server.workers or os.cpu_count() or 1

    @property
    def embedded_redis(self) -> bool:
        return self.redis.mode == SINGLE and self.redis.url == EMBEDDED

    @property
    def redis_connect_url(self) -> str:
        """Where a client reaches Redis: `redis.url`, or the embedded Redis's socket."""
        return embedded_redis_url(self.redis.data_dir) if self.embedded_redis else self.redis.url


def embedded_redis_url(data_dir: str) -> str:
    """The Unix socket the embedded Redis listens on (the master starts it there)."""
    return "unix://" + os.path.join(os.path.abspath(data_dir), EMBEDDED_SOCKET)


def _check(setting: Setting, raw: Any) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(setting.name, str(exc)) from None


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def _from_file(data: Mapping[str, Any]) -> dict[str, Any]:
    known = {s.name: s for s in SETTINGS}
    found: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table ([section])")
        for key, raw in table.items():
            name = f"{section}.{key}"
            if name not in known:
                raise ConfigError(name, "unknown key")
            found[name] = raw
    return found


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` (optional), apply `env` and `overrides` ({"server.workers": 4}), validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = _from_file(_read_file(path)) if path else {}
    for s in SETTINGS:
        if s.env and env.get(s.env):
            raw[s.name] = env[s.env]
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
    values = {s.name: _check(s, raw.get(s.name, s.default)) for s in SETTINGS}
    cfg = Config(values=values, path=path,
                 overrides={k: v for k, v in (overrides or {}).items() if v is not None})
    if cfg.worker_count > cfg.server.max_workers:
        raise ConfigError("server.workers", f"{cfg.worker_count} workers is over server.max_workers "
                          f"({cfg.server.max_workers})")
    both = set(cfg.auth.keys) & set(cfg.auth.public_keys)
    if both:
        raise ConfigError("auth.public_keys", f"{len(both)} key(s) also in auth.keys: a key is secret "
                          "(headers only) or public (may be in URLs), not both")
    if cfg.limits.max_buffered_bytes < cfg.limits.max_body:
        raise ConfigError("limits.max_buffered_bytes", f"{cfg.limits.max_buffered_bytes} bytes cannot hold one "
                          f"body of limits.max_body ({cfg.limits.max_body})")
    _check_redis_topology(cfg, set(raw))
    if cfg.spool.max_bytes < cfg.limits.max_body + SPOOL_FRAMING:
        raise ConfigError("spool.max_bytes", f"{cfg.spool.max_bytes} bytes cannot hold one request of "
                          f"limits.max_body ({cfg.limits.max_body}) and its framing ({SPOOL_FRAMING} bytes)")
    return cfg


def _check_redis_topology(cfg: Config, given: set[str]) -> None:
    """The [redis] keys that belong together: each mode takes its own and refuses the others',
    so a config meant for one mode cannot run quietly in another."""
    r = cfg.redis
    if r.mode == SINGLE:
        for key, what in (("nodes", "cluster or sentinel nodes"), ("sentinel_master", "a sentinel master name"),
                          ("username", "a username (put it in redis.url)"),
                          ("password", "a password (put it in redis.url)"), ("tls", "tls (use a rediss:// URL)"),
                          ("shards", "shards (cluster mode only)")):
            if f"redis.{key}" in given and cfg.values[f"redis.{key}"] != _DEFAULTS[f"redis.{key}"]:
                raise ConfigError(f"redis.{key}", f"redis.mode = \"single\" takes no {what}")
        if r.wait_replicas and r.url == EMBEDDED:
            raise ConfigError("redis.wait_replicas", "the embedded Redis has no replicas to wait for")
        return
    if "redis.url" in given:
        raise ConfigError("redis.url", f"not used in {r.mode} mode: list the "
                          f"{'seed nodes' if r.mode == CLUSTER else 'sentinels'} in redis.nodes")
    if not r.nodes:
        raise ConfigError("redis.nodes", f"{r.mode} mode needs at least one \"HOST:PORT\" "
                          f"({'a node of the cluster' if r.mode == CLUSTER else 'a sentinel'})")
    if r.mode == SENTINEL:
        if not r.sentinel_master:
            raise ConfigError("redis.sentinel_master", "sentinel mode needs the name the sentinels monitor")
        if "redis.shards" in given:
            raise ConfigError("redis.shards", "only in cluster mode: sentinel mode has one queue list")
        return
    if r.sentinel_master:
        raise ConfigError("redis.sentinel_master", "only in sentinel mode")
    for key in ("redis.queue", "consumer.dead_letter"):
        if "{" in cfg.values[key] or "}" in cfg.values[key]:
            raise ConfigError(key, "no braces in cluster mode: each shard's key gets its own hash tag")


def reload(current: Config) -> Config:
    """The config file read again, with the flags given at start; ConfigError if invalid."""
    return load(current.path, overrides=current.overrides)


@dataclass
class ReloadPlan:
    changed: list[str]
    hot: list[str]
    replace: list[str]

    @property
    def mode(self) -> str:
        if not self.changed:
            return "none"
        return REPLACE if self.replace else HOT if self.hot else "scale"


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """What a reload from `old` to `new` must do; ConfigError names a key that needs a restart.
    The worker count alone is changed by scaling, like TTIN/TTOU, not by replacing workers."""
    by_name = {s.name: s for s in SETTINGS}
    changed = [name for name in by_name if old.values[name] != new.values[name]]
    for name in changed:
        if by_name[name].reload == RESTART or (
                name == "redis.url" and EMBEDDED in (old.values[name], new.values[name])):
            raise ConfigError(name, "cannot change while meteorit runs; restart it to apply")
    hot = [name for name in changed if by_name[name].reload == HOT]
    replace = [name for name in changed if by_name[name].reload == REPLACE and name != "server.workers"]
    return ReloadPlan(changed, hot, replace)


def reference_markdown() -> str:
    """The config reference table for the README, generated from SETTINGS."""
    rows = ["| key | default | env | on reload | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = json.dumps(s.default)  # TOML spelling: true, "1MiB", ["a"]
        rows.append(f"| `{s.name}` | `{default}` | {s.env or ''} | {s.reload} | {s.help} |")
    return "\n".join(rows)
