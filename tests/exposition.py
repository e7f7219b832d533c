"""Reading a /metrics scrape as Prometheus does (prometheus_client's own parser), and
checking it against Prometheus's naming and exposition conventions; for test_metrics.py
(the real service) and test_prometheus.py (the text made from snapshots)."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
UNITS = ("seconds", "bytes", "events")
MASTERS_OWN = {"meteorit_workers", "meteorit_workers_missing", "meteorit_master_up", "meteorit_worker_restarts",
               "meteorit_reloads", "meteorit_reload_failures"}  # families without a `worker` label


def samples(text: str) -> Samples:
    """Every sample of a scrape, read by prometheus_client's parser, each (name, labels)
    once, after checking the families against Prometheus's naming conventions."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        check_conventions(family)
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"a series twice: {key}"
            out[key] = s.value
    return out


def check_conventions(family: Any) -> None:
    """https://prometheus.io/docs/practices/naming/ and the exposition format's rules."""
    assert family.name.startswith("meteorit_") and NAME.match(family.name), family.name
    assert family.documentation, f"{family.name} has no HELP"
    assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
    for s in family.samples:
        assert all(LABEL.match(k) and not k.startswith("__") for k in s.labels), s
        assert ("worker" in s.labels) == (family.name not in MASTERS_OWN), f"worker label: {s}"
    if family.type == "counter":  # the parser names a counter's family without its `_total`
        assert all(s.name == family.name + "_total" for s in family.samples), family.name
    if "duration" in family.name or "seconds" in family.name:
        assert family.name.endswith("_seconds"), family.name
    if "bytes" in family.name:
        assert family.name.endswith("_bytes"), family.name
    if family.type == "histogram":  # observes a quantity: its unit ends the name, plural
        assert family.name.rsplit("_", 1)[1] in UNITS, f"{family.name} names no unit"
        _check_histogram(family)


def _check_histogram(family: Any) -> None:
    by_worker: dict[str, list[Any]] = {}
    for s in family.samples:
        assert s.name in (family.name + "_bucket", family.name + "_sum", family.name + "_count"), s.name
        assert ("le" in s.labels) == s.name.endswith("_bucket"), s
        by_worker.setdefault(s.labels["worker"], []).append(s)
    for worker, series in by_worker.items():
        buckets = [s for s in series if s.name.endswith("_bucket")]
        bounds = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (family.name, worker, bounds)
        assert counts == sorted(counts), f"{family.name} buckets are not cumulative: {counts}"
        (count,) = [s.value for s in series if s.name.endswith("_count")]
        assert counts[-1] == count, (family.name, worker)


def total(found: Samples, name: str, **labels: str) -> float:
    """sum(name{labels}) as PromQL would compute it: over every series that has them."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in found.items() if n == name and wanted <= series)


def by_worker(found: Samples, name: str) -> dict[str, float]:
    return {dict(series)["worker"]: v for (n, series), v in found.items() if n == name}
