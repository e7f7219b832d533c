"""The layout's rules, read from the imports of every module (ast, no execution):
which package may import which, who talks to Redis, and how large a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "meteorit"
MAX_LINES = 500  # "about 400"; a module past this is due for a split by concern


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every meteorit module `path` imports, at the top or inside a function, resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            # `from meteorit.worker import spool` imports meteorit.worker.spool
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "meteorit" or m.startswith("meteorit.")}


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(modules: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{mod} imports {dep}" for mod, deps in modules.items() if in_package(mod, importer)
                  for dep in deps if any(in_package(dep, f) for f in forbidden))


def test_the_modules_are_found() -> None:
    assert {"meteorit.bus.ipc", "meteorit.worker.writer", "meteorit.master.arbiter",
            "meteorit.consumer.command", "meteorit.record", "meteorit.config", "meteorit.scoreboard"} <= MODULES.keys()


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("meteorit.bus", ("meteorit.master", "meteorit.worker", "meteorit.consumer")),
    ("meteorit.consumer", ("meteorit.master", "meteorit.worker")),
    ("meteorit.worker", ("meteorit.master", "meteorit.consumer")),
    ("meteorit.config", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus")),
    ("meteorit.values", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus",
                         "meteorit.config")),
    ("meteorit.topology", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus")),
    ("meteorit.record", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus")),
    ("meteorit.metrics", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus")),
    ("meteorit.scoreboard", ("meteorit.master", "meteorit.worker", "meteorit.consumer", "meteorit.bus",
                             "meteorit.metrics")),
])
def test_package_imports_nothing_it_must_not(importer: str, forbidden: tuple[str, ...]) -> None:
    assert violations(MODULES, importer, forbidden) == []


def test_the_rule_checker_sees_a_violation() -> None:
    """The checker itself: a relative import that climbs out of the package is resolved."""
    planted = {"meteorit.bus.ipc": {"meteorit.worker.writer"}, "meteorit.business": {"meteorit.worker"}}
    assert violations(planted, "meteorit.bus", ("meteorit.worker",)) == [
        "meteorit.bus.ipc imports meteorit.worker.writer"]  # meteorit.business is not in meteorit.bus
    assert "meteorit.errors" in MODULES["meteorit.bus.ipc"]  # `from ..errors import` resolved


def import_cycles(modules: dict[str, set[str]], package: str) -> list[list[str]]:
    """The groups of `package`'s modules that import each other round in a circle (a cycle
    works by accident of import order, and cannot be split along its modules)."""
    inside = {m for m in modules if in_package(m, package)}
    graph = {m: sorted(d for d in modules[m] if d in inside and d != m) for m in sorted(inside)}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    reached = {m: reach(m) for m in graph}
    groups = {tuple(sorted({m} | {o for o in reached[m] if m in reached[o]})) for m in graph if m in reached[m]}
    return sorted(list(g) for g in groups)


def test_the_consumer_modules_import_each_other_without_a_cycle() -> None:
    """One module per sink: each imports what sinks share (consumer.sink), never another sink
    nor the command that picks one."""
    assert import_cycles(MODULES, "meteorit.consumer") == []
    sinks = ("meteorit.consumer.sqlite", "meteorit.consumer.ndjson", "meteorit.consumer.postgresql")
    assert violations(MODULES, "meteorit.consumer.sink", sinks + ("meteorit.consumer.command",)) == []
    for sink in sinks:
        others = tuple(s for s in sinks if s != sink) + ("meteorit.consumer.command", "meteorit.consumer.pipeline")
        assert violations(MODULES, sink, others) == []


def test_the_cycle_checker_sees_a_cycle() -> None:
    planted = {"meteorit.consumer.sink": {"meteorit.consumer.sqlite", "meteorit.config"},
               "meteorit.consumer.sqlite": {"meteorit.consumer.rows", "meteorit.consumer.sink"},
               "meteorit.consumer.rows": set(), "meteorit.config": {"meteorit.consumer.rows"},
               "meteorit.consumer.a": {"meteorit.consumer.b"}, "meteorit.consumer.b": {"meteorit.consumer.c"},
               "meteorit.consumer.c": {"meteorit.consumer.a"}}
    assert import_cycles(planted, "meteorit.consumer") == [
        ["meteorit.consumer.a", "meteorit.consumer.b", "meteorit.consumer.c"],
        ["meteorit.consumer.sink", "meteorit.consumer.sqlite"]]


def test_only_the_writer_and_the_spool_talk_to_redis_on_the_ingest_side() -> None:
    def uses_redis(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n in ("redis", "hiredis") or n.startswith(("redis.", "hiredis.")) for n in names):
                return True
        return False

    ingest = [p for p in (PACKAGE / "worker").rglob("*.py") if uses_redis(p)]
    allowed = ("meteorit.worker.writer", "meteorit.worker.spool")
    assert sorted(module_name(p) for p in ingest if not module_name(p).startswith(allowed)) == []


def test_no_module_is_a_thousand_line_grab_bag() -> None:
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
