"""bin/meteorit-consumer-bench on a few thousand events: the floor and the consumer both
run, both are checked row for row, and the summary gives their ratio. The figures are
not asserted (this machine is shared); the checks and the report are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bin" / "meteorit-consumer-bench"
EVENTS = 3000


def test_the_bench_checks_and_reports_the_consumer_against_its_floor_with_random_ids() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--events", str(EVENTS), "--runs", "1",
                          "--sinks", "sqlite,ndjson", "--ids", "random", "--batch", "1000"],
                         capture_output=True, text=True, timeout=300, start_new_session=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ids: random" in out.stdout
    runs = [line for line in out.stdout.splitlines() if line.startswith("  run 1 ")]
    assert len(runs) == 2
    for line in runs:
        assert re.search(r"floor +[0-9.]+ s \(cpu +[0-9.]+ s\) +x[0-9.]+ +rows 3,000 +ok", line), line
    table = [line for line in out.stdout.splitlines() if line.startswith(("| sqlite |", "| ndjson |"))]
    assert len(table) == 2
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == "1" and re.fullmatch(r"[0-9.]+x", cells[7]) and cells[-1] == "yes", line
