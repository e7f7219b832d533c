"""Config: defaults, the TOML file, environment and command-line overrides, and every
rejection naming its key; plus `meteorit -t` as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from meteorit.config import load
from meteorit.values import SQLITE_TIMEOUT, SinkUrl, check_table, parse_listen_address, parse_sink_url, size
from meteorit.errors import ConfigError

WriteConfig = Callable[[str], str]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Writes TOML text to a file and returns its path."""
    def write(text: str) -> str:
        path = tmp_path / "meteorit.toml"
        path.write_text(text)
        return str(path)
    return write


def error_of(*args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(*args, **kwargs)
    return info.value


# --- defaults and the file


def test_defaults_load_without_a_file() -> None:
    cfg = load(env={})
    assert cfg.path is None
    assert cfg.server.listen == ["127.0.0.1:8080"]
    assert cfg.server.workers == 0
    assert cfg.redis.url == "embedded" and cfg.embedded_redis
    assert cfg.redis.batch_max_bytes == 4 * 1024 * 1024
    assert cfg.limits.max_body == 1024 * 1024
    assert cfg.limits.max_event_size == 64 * 1024
    assert cfg.limits.max_header_size == 16 * 1024
    assert (cfg.limits.header_timeout, cfg.limits.keepalive_timeout) == (10.0, 75.0)
    assert cfg.auth.keys == []
    assert (cfg.log.level, cfg.log.format) == ("info", "auto")


def test_a_toml_file_is_read(write_config: WriteConfig) -> None:
    path = write_config(
        '[server]\nlisten = ["0.0.0.0:9000", "unix:/run/m.sock"]\nworkers = 3\n'
        '[redis]\nurl = "redis://127.0.0.1:6380/2"\nqueue = "q"\n'
        '[auth]\nkeys = ["k1", "k2"]\n'
        '[limits]\nmax_body = "64KiB"\nheader_timeout = 2\n'
        '[log]\nlevel = "debug"\n')
    cfg = load(path, env={})
    assert cfg.path == path
    assert cfg.server.listen == ["0.0.0.0:9000", "unix:/run/m.sock"]
    assert cfg.server.workers == 3 and cfg.worker_count == 3
    assert cfg.redis.url == "redis://127.0.0.1:6380/2" and not cfg.embedded_redis
    assert cfg.redis.queue == "q"
    assert cfg.auth.keys == ["k1", "k2"]
    assert cfg.limits.max_body == 65536
    assert cfg.limits.header_timeout == 2.0
    assert cfg.log.level == "debug"
    assert cfg.limits.max_pipeline == 32  # untouched keys keep their defaults


def test_the_version_changes_with_the_settings(write_config: WriteConfig) -> None:
    assert load(env={}).version == load(env={}).version
    assert load(env={}).version != load(write_config("[server]\nworkers = 3\n"), env={}).version


@pytest.mark.parametrize("text, key, reason", [
    ("[servr]\nworkers = 2\n", "servr", "unknown section"),
    ("[limits]\nmax_bdy = 10\n", "limits.max_bdy", "unknown key"),
    ("[log]\nlevel = \"info\"\ncolour = true\n", "log.colour", "unknown key"),
    ("server = 5\n", "server", "must be a table"),
    ("[server\nworkers = 2\n", "config", "not valid TOML"),
])
def test_file_errors_name_the_key(write_config: WriteConfig, text: str, key: str, reason: str) -> None:
    error = error_of(write_config(text), env={})
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{key}: ")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    error = error_of(str(tmp_path / "nope.toml"), env={})
    assert error.key == "config" and "file not found" in error.reason


# --- every parser rejects bad values, naming the key


@pytest.mark.parametrize("key, toml_value", [
    ("server.listen", "[]"),
    ("server.listen", '"localhost"'),
    ("server.listen", '["127.0.0.1:8080", "127.0.0.1:http"]'),
    ("server.listen", "8080"),
    ("server.workers", "-1"),
    ("server.workers", '"many"'),
    ("server.workers", "2.5"),
    ("server.workers", "true"),
    ("server.backlog", "0"),
    ("server.backlog", '"2048"'),
    ("server.graceful_timeout", "0"),
    ("server.graceful_timeout", "-5.0"),
    ("server.graceful_timeout", '"30s"'),
    ("server.graceful_timeout", "nan"),
    ("redis.url", '""'),
    ("redis.url", '"http://127.0.0.1:6379"'),
    ("redis.url", '"redis://127.0.0.1:port/0"'),
    ("redis.url", "6379"),
    ("redis.queue", '""'),
    ("redis.timeout", "false"),
    ("redis.batch_max_events", "0"),
    ("redis.batch_max_bytes", '"4 lots"'),
    ("redis.max_pending_bytes", '"-1MiB"'),
    ("redis.data_dir", "[]"),
    ("redis.server_binary", '""'),
    ("auth.keys", '"secret"'),
    ("auth.keys", '["ok", ""]'),
    ("auth.keys", "[1, 2]"),
    ("limits.max_body", '"lots"'),
    ("limits.max_body", '"1.5MiB"'),
    ("limits.max_body", "0"),
    ("limits.max_body", "true"),
    ("limits.max_body", "1.5"),
    ("limits.max_event_size", '"0KiB"'),
    ("limits.max_events_per_request", '"1000"'),
    ("limits.max_header_size", "-16384"),
    ("limits.max_headers", "0"),
    ("limits.max_pipeline", "1.5"),
    ("limits.max_connections", "0"),
    ("limits.header_timeout", '"10s"'),
    ("limits.header_timeout", "nan"),
    ("limits.body_timeout", "-1"),
    ("limits.keepalive_timeout", "0.0"),
    ("log.level", '"verbose"'),
    ("log.level", '"INFO"'),
    ("log.format", '"xml"'),
])
def test_a_bad_value_is_rejected_naming_its_key(write_config: WriteConfig, key: str, toml_value: str) -> None:
    section, name = key.split(".")
    error = error_of(write_config(f"[{section}]\n{name} = {toml_value}\n"), env={})
    assert error.key == key
    assert str(error).startswith(f"{key}: must be") or str(error).startswith(f"{key}: bad")


@pytest.mark.parametrize("text, expected", [
    ("65536", 65536), ("512b", 512), ("64KiB", 65536), ("64kb", 65536), ("2k", 2048),
    ("1MiB", 1 << 20), (" 4 MiB ", 4 << 20), ("1m", 1 << 20), ("1GiB", 1 << 30),
])
def test_sizes_take_bytes_or_binary_units(text: str, expected: int) -> None:
    assert size(text) == expected


def test_sizes_in_the_file_take_units(write_config: WriteConfig) -> None:
    cfg = load(write_config('[limits]\nmax_body = "1MiB"\nmax_event_size = "64KiB"\nmax_header_size = 8192\n'),
               env={})
    assert (cfg.limits.max_body, cfg.limits.max_event_size, cfg.limits.max_header_size) == (
        1 << 20, 65536, 8192)


def test_the_body_budget_defaults_to_64mib_and_must_hold_one_whole_body(write_config: WriteConfig) -> None:
    assert load(env={}).limits.max_buffered_bytes == 64 << 20
    error = error_of(write_config('[limits]\nmax_body = "2MiB"\nmax_buffered_bytes = "1MiB"\n'), env={})
    assert error.key == "limits.max_buffered_bytes" and "cannot hold one body" in error.reason
    cfg = load(write_config('[limits]\nmax_body = "2MiB"\nmax_buffered_bytes = "2MiB"\n'), env={})
    assert cfg.limits.max_buffered_bytes == 2 << 20


# --- environment and command-line overrides


def test_environment_overrides() -> None:
    cfg = load(env={"METEORIT_LISTEN": "127.0.0.1:9000, [::1]:9001,unix:/tmp/m.sock",
                    "METEORIT_WORKERS": "3", "METEORIT_REDIS_URL": "redis://10.0.0.1:6379/1"})
    assert cfg.server.listen == ["127.0.0.1:9000", "[::1]:9001", "unix:/tmp/m.sock"]
    assert cfg.server.workers == 3
    assert cfg.redis.url == "redis://10.0.0.1:6379/1"


def test_empty_environment_variables_are_ignored() -> None:
    cfg = load(env={"METEORIT_LISTEN": "", "METEORIT_WORKERS": "", "METEORIT_REDIS_URL": ""})
    assert (cfg.server.listen, cfg.server.workers, cfg.redis.url) == (["127.0.0.1:8080"], 0, "embedded")


def test_other_environment_variables_are_ignored() -> None:
    assert load(env={"METEORIT_MAX_BODY": "1", "METEORIT_QUEUE": "x"}).redis.queue == "meteorit:events"


@pytest.mark.parametrize("env, key", [
    ({"METEORIT_WORKERS": "four"}, "server.workers"),
    ({"METEORIT_WORKERS": "-2"}, "server.workers"),
    ({"METEORIT_LISTEN": "127.0.0.1"}, "server.listen"),
    ({"METEORIT_LISTEN": " , "}, "server.listen"),
    ({"METEORIT_REDIS_URL": "localhost:6379"}, "redis.url"),
])
def test_a_bad_environment_value_names_the_key(env: dict[str, str], key: str) -> None:
    assert error_of(env=env).key == key


def test_overrides_beat_environment_beat_file(write_config: WriteConfig) -> None:
    path = write_config('[server]\nworkers = 2\nlisten = ["127.0.0.1:7000"]\n[redis]\nurl = "redis://file:1/0"\n')
    env = {"METEORIT_WORKERS": "3", "METEORIT_REDIS_URL": "redis://env:1/0"}
    overrides = {"server.workers": 4, "server.listen": None, "redis.url": None}  # None: flag not given
    assert load(path, env={}).server.workers == 2
    from_env = load(path, env=env)
    assert (from_env.server.workers, from_env.redis.url) == (3, "redis://env:1/0")
    overridden = load(path, env=env, overrides=overrides)
    assert (overridden.server.workers, overridden.redis.url) == (4, "redis://env:1/0")
    assert overridden.server.listen == ["127.0.0.1:7000"]


def test_a_bad_override_names_the_key() -> None:
    assert error_of(env={}, overrides={"server.listen": ["nowhere"]}).key == "server.listen"


def test_workers_0_means_one_per_cpu() -> None:
    assert load(env={"METEORIT_WORKERS": "0"}).worker_count == os.cpu_count()
    assert load(env={}, overrides={"server.workers": 5}).worker_count == 5


# --- listen addresses


@pytest.mark.parametrize("address, parsed", [
    ("127.0.0.1:8080", ("inet", ("127.0.0.1", 8080))),
    ("localhost:80", ("inet", ("localhost", 80))),
    (":8080", ("inet", ("0.0.0.0", 8080))),
    ("0.0.0.0:65535", ("inet", ("0.0.0.0", 65535))),
    ("[::1]:8080", ("inet6", ("::1", 8080))),
    ("[::]:9000", ("inet6", ("::", 9000))),
    ("unix:/run/meteorit.sock", ("unix", "/run/meteorit.sock")),
    ("unix:relative.sock", ("unix", "relative.sock")),
])
def test_listen_addresses_parse(address: str, parsed: tuple[str, Any]) -> None:
    assert parse_listen_address(address) == parsed


@pytest.mark.parametrize("address", [
    "", "8080", "localhost", "localhost:", "localhost:http", "localhost:-1", "localhost:65536",
    "[::1]", "[::1]:", "unix:", "::1:8080", "[::1:8080",
])
def test_bad_listen_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ValueError, match="listen address"):
        parse_listen_address(address)
    assert error_of(env={"METEORIT_LISTEN": address or ","}).key == "server.listen"


# --- the consumer's sink URL and table: declared here, so `meteorit -t` checks them too


@pytest.mark.parametrize("url, parsed", [
    ("sqlite:///var/meteorit.db", SinkUrl("sqlite", "var/meteorit.db", SQLITE_TIMEOUT)),
    ("sqlite:////var/lib/meteorit/events.db", SinkUrl("sqlite", "/var/lib/meteorit/events.db")),
    ("sqlite:///x.db?timeout=0.5", SinkUrl("sqlite", "x.db", 0.5)),
    ("sqlite:///x.db?timeout=0", SinkUrl("sqlite", "x.db", 0.0)),
    ("postgresql://app@db:5432/analytics", SinkUrl("postgresql", "postgresql://app@db:5432/analytics")),
    ("postgres://db/analytics", SinkUrl("postgresql", "postgres://db/analytics")),
    ("ndjson:-", SinkUrl("ndjson", "-")),
    ("ndjson:/var/events.ndjson", SinkUrl("ndjson", "/var/events.ndjson")),
])
def test_sink_urls_parse(write_config: WriteConfig, url: str, parsed: SinkUrl) -> None:
    assert parse_sink_url(url) == parsed
    assert load(write_config(f'[consumer]\nsink = "{url}"\n'), env={}).consumer.sink == url


@pytest.mark.parametrize("url, reason", [
    ("mysql://db/events", "unknown sink 'mysql://db/events': use sqlite:///PATH"),
    ("sqlite://x.db", "unknown sink"),
    ("sqlite:///", "no database path"),
    ("sqlite:///?timeout=1", "no database path"),
    ("sqlite:///x.db?timeout=soon", "timeout must be a number of seconds"),
    ("sqlite:///x.db?timeout=-1", "timeout must be >= 0"),
    ("sqlite:///x.db?timeout=nan", "timeout must be >= 0"),
    ("sqlite:///x.db?mode=ro", "unknown sqlite parameter 'mode' (known: timeout)"),
    ("sqlite:///x.db?timeout", "bad query field"),
    ("ndjson:", "ndjson needs a path or - (stdout)"),
    ("", "must be a non-empty string"),
])
def test_a_bad_sink_url_names_consumer_sink_and_the_reason(write_config: WriteConfig, url: str,
                                                           reason: str) -> None:
    error = error_of(write_config(f'[consumer]\nsink = "{url}"\n'), env={})
    assert error.key == "consumer.sink" and reason in error.reason
    assert error_of(env={}, overrides={"consumer.sink": url}).key == "consumer.sink"  # --sink URL


@pytest.mark.parametrize("table", ["events", "_events_2", "E" * 63])
def test_a_table_is_a_plain_sql_identifier(write_config: WriteConfig, table: str) -> None:
    assert check_table(table) == table
    assert load(write_config(f'[consumer]\ntable = "{table}"\n'), env={}).consumer.table == table


@pytest.mark.parametrize("table", ["events; DROP TABLE x", "2events", "my-events", "\"events\"", "E" * 64,
                                   "événements"])
def test_a_table_that_is_not_a_plain_identifier_is_rejected(write_config: WriteConfig, table: str) -> None:
    with pytest.raises(ValueError, match="plain SQL identifier"):
        check_table(table)
    error = error_of(env={}, overrides={"consumer.table": table})
    assert error.key == "consumer.table" and "plain SQL identifier" in error.reason
    assert error_of(env={}, overrides={"consumer.table": ""}).reason.startswith("must be a non-empty string")


# --- the real command line: meteorit -t


ROOT = Path(__file__).resolve().parent.parent


def run_check(path: str) -> subprocess.CompletedProcess[str]:
    """`meteorit -t -c PATH` as the console script runs it, on this checkout's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METEORIT_")}
    return subprocess.run([sys.executable, "-m", "meteorit.cli", "-t", "-c", path], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)


def test_meteorit_t_accepts_a_valid_file(write_config: WriteConfig) -> None:
    path = write_config('[limits]\nmax_body = "2MiB"\n')
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and path in result.stdout


def test_meteorit_t_rejects_a_bad_file_naming_the_key_and_the_reason(write_config: WriteConfig) -> None:
    result = run_check(write_config('[limits]\nmax_body = "lots"\n'))
    assert result.returncode == 1
    assert "limits.max_body" in result.stderr
    assert "must be a size" in result.stderr and "'lots'" in result.stderr
    assert result.stdout == ""



# --- [redis] mode: single, cluster, sentinel


CLUSTER_TOML = '[redis]\nmode = "cluster"\nnodes = ["10.0.0.1:7000", "[::1]:7001"]\npassword = "pw"\n'
SENTINEL_TOML = '[redis]\nmode = "sentinel"\nnodes = ["10.0.0.9:26379"]\nsentinel_master = "events"\n'


def test_cluster_and_sentinel_modes_take_their_own_keys(write_config: WriteConfig) -> None:
    cfg = load(write_config(CLUSTER_TOML + "shards = 8\nwait_replicas = 1\n"), env={})
    assert (cfg.redis.mode, cfg.redis.nodes, cfg.redis.shards, cfg.redis.wait_replicas) == (
        "cluster", ["10.0.0.1:7000", "[::1]:7001"], 8, 1)
    assert not cfg.embedded_redis  # redis.url keeps its default, unused: no embedded Redis
    cfg = load(write_config(SENTINEL_TOML), env={})
    assert (cfg.redis.mode, cfg.redis.sentinel_master, cfg.redis.shards) == ("sentinel", "events", 16)
    assert load(env={"METEORIT_REDIS_NODES": "a:1, b:2"}, overrides={"redis.mode": "cluster"}).redis.nodes == [
        "a:1", "b:2"]


@pytest.mark.parametrize(("toml", "key", "reason"), [
    ('[redis]\nmode = "cluster"\n', "redis.nodes", "cluster mode needs at least one"),
    ('[redis]\nmode = "sentinel"\nnodes = ["s:26379"]\n', "redis.sentinel_master", "sentinel mode needs"),
    ('[redis]\nmode = "sentinel"\nsentinel_master = "m"\n', "redis.nodes", "a sentinel"),
    (CLUSTER_TOML + 'url = "redis://x:6379"\n', "redis.url", "not used in cluster mode"),
    (SENTINEL_TOML + "shards = 4\n", "redis.shards", "only in cluster mode"),
    (CLUSTER_TOML + 'sentinel_master = "m"\n', "redis.sentinel_master", "only in sentinel mode"),
    (CLUSTER_TOML + 'queue = "{meteorit}:events"\n', "redis.queue", "no braces in cluster mode"),
    (CLUSTER_TOML + '[consumer]\ndead_letter = "dead:{x}"\n', "consumer.dead_letter", "no braces"),
    ('[redis]\nnodes = ["a:1"]\n', "redis.nodes", 'mode = "single" takes no'),
    ('[redis]\npassword = "pw"\n', "redis.password", "put it in redis.url"),
    ('[redis]\ntls = true\n', "redis.tls", "rediss://"),
    ('[redis]\nshards = 4\n', "redis.shards", "cluster mode only"),
    ('[redis]\nwait_replicas = 1\n', "redis.wait_replicas", "embedded Redis has no replicas"),
    ('[redis]\nmode = "ring"\n', "redis.mode", "must be one of single, cluster, sentinel"),
    (CLUSTER_TOML + "shards = 0\n", "redis.shards", "positive integer"),
    (CLUSTER_TOML + "shards = 5000\n", "redis.shards", "at most 1024"),
    ('[redis]\nmode = "cluster"\nnodes = ["host"]\n', "redis.nodes", "expected HOST:PORT"),
    ('[redis]\nmode = "cluster"\nnodes = ["::1:7000"]\n', "redis.nodes", "[V6]:PORT"),
    ('[redis]\nmode = "cluster"\nnodes = "a:1"\nwait_replicas = -1\n', "redis.wait_replicas", ">= 0"),
])
def test_a_wrong_redis_combination_names_the_key(write_config: WriteConfig, toml: str, key: str,
                                                 reason: str) -> None:
    error = error_of(write_config(toml), env={})
    assert error.key == key and reason in error.reason, (error.key, error.reason)


def test_wait_replicas_is_hot_and_the_topology_needs_a_restart(write_config: WriteConfig) -> None:
    from meteorit.config import reload_plan
    old = load(write_config(CLUSTER_TOML), env={})
    assert reload_plan(old, load(write_config(CLUSTER_TOML + "wait_replicas = 1\n"), env={})).mode == "hot"
    assert reload_plan(old, load(write_config(CLUSTER_TOML.replace("7000", "7002")), env={})).mode == "replace"
    for change in ("shards = 4\n", ):
        with pytest.raises(ConfigError) as info:
            reload_plan(old, load(write_config(CLUSTER_TOML + change), env={}))
        assert info.value.key == "redis.shards"
    with pytest.raises(ConfigError) as info:
        reload_plan(old, load(write_config(SENTINEL_TOML), env={}))
    assert info.value.key == "redis.mode"


def test_meteorit_t_checks_the_redis_topology(write_config: WriteConfig) -> None:
    assert run_check(write_config(CLUSTER_TOML)).returncode == 0
    result = run_check(write_config('[redis]\nmode = "sentinel"\nnodes = ["s:26379"]\n'))
    assert result.returncode == 1
    assert "redis.sentinel_master" in result.stderr and "sentinel mode needs" in result.stderr
