"""The NDJSON sink: ndjson:PATH or ndjson:- (stdout).

Owns: the NDJSON file (or stdout) and how a batch gets there. Must not touch: Redis.

One record per line, appended (fsync per batch) or to stdout; redelivered batches are
written again (at-least-once: dedupe by id when reading). A batch that fails half
written is cut off the file before the retry, so no torn line and no half batch twice
(one consumer per file). A closed stdout (the reader of `| head` is gone) is SinkFailed:
nothing can ever be written there again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from .rows import Rows
from .sink import SinkFailed, SinkUnavailable, Written

log = logging.getLogger("meteorit.sinks")


class NdjsonSink:
    kind = "ndjson"
    writers = 1

    def __init__(self, target: str) -> None:
        self.target = target
        self.to_stdout = target == "-"
        self._fd: int | None = None  # the file's (not stdout's)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ndjson-writer")

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        if self._fd is None and not self.to_stdout:
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    async def write(self, rows: Rows) -> Written:
        await self._run(self._write, rows.records)
        return Written(len(rows.records), [])

    def _write(self, records: list[bytes]) -> None:
        data = b"\x00".join(records)
        if b"\n" in data or b"\r" in data:  # one record per line: compact what is spread out
            data = b"\x00".join(orjson_compact(r) for r in records)
        data = data.replace(b"\x00", b"\n") + b"\n"
        if self.to_stdout:
            self._write_stdout(data)
        else:
            self._open()
            assert self._fd is not None
            self._append(self._fd, data)

    @staticmethod
    def _write_stdout(data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader is gone for good. What is still buffered goes nowhere at exit,
            # instead of failing once more on the way out.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SinkFailed("ndjson: stdout is closed (its reader went away)") from None

    @staticmethod
    def _append(fd: int, data: bytes) -> None:
        """The whole batch, or nothing: a failed write (disk full) is cut off the file,
        so the retry leaves no torn line and no part of the batch twice."""
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                log.error("cannot cut a half-written batch off the NDJSON file",
                          extra={"error": str(exc), "size": size})
            raise

    async def close(self) -> None:
        if self._fd is not None:
            await self._run(os.close, self._fd)
            self._fd = None
        self._thread.shutdown()

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except OSError as exc:
            raise SinkUnavailable(f"ndjson: {exc}") from exc


def orjson_compact(record: bytes) -> bytes:
    return orjson.dumps(orjson.loads(record))
