"""meteorit.consumer.progress: the live line a terminal shows, the progress lines in the
log, the lag and the summary at exit, driven without Redis (the depth and the batches in
hand are what the pipeline would give). End to end, tests/test_consumer.py reads the same
lines from real consumers off a terminal."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from meteorit.consumer.progress import Counters, Progress



def now_ms() -> int:
    return int(time.time() * 1000)


class Pipeline:
    """What the pipeline gives a Progress: the queue's depth (None: Redis cannot say) and
    the batches in hand; counts the reads, and tells when `reads` of them happened."""

    def __init__(self, depth: int | None, in_hand: int = 0, reads: int = 2) -> None:
        self.depth_now = depth
        self.in_hand_now = in_hand
        self.reads = 0
        self.enough = asyncio.Event()
        self.wanted = reads

    async def depth(self) -> int | None:
        self.reads += 1
        if self.reads >= self.wanted:
            self.enough.set()
        return self.depth_now

    def in_hand(self) -> int:
        return self.in_hand_now


def progress(pipeline: Pipeline, *, live: bool, sink_on_stdout: bool = False, every: float = 10.0,
             **counts: int) -> Progress:
    return Progress(Counters(**counts), pipeline.depth, pipeline.in_hand, live=live, every=every,
                    sink_on_stdout=sink_on_stdout)


def test_the_live_line_redraws_itself_with_the_counts(capsys: pytest.CaptureFixture[str]) -> None:
    p = progress(Pipeline(depth=12345, in_hand=3), live=True, stored=1_500_000, dead=7,
                 newest_received_at=now_ms() - 2500)
    p.show(98765.4, 12345)
    err = capsys.readouterr().err
    assert err.startswith("\r\x1b[K") and "\n" not in err
    assert "98,765 events/s  queue 12,345  lag 2." in err
    assert err.endswith("s  stored 1,500,000  dead 7  in hand 3")


def test_the_live_line_says_what_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    progress(Pipeline(depth=None), live=True).show(0.0, None)
    assert capsys.readouterr().err == "\r\x1b[K" + "         0 events/s  queue ?  lag -  stored 0  dead 0  in hand 0"


def test_off_a_terminal_progress_goes_to_the_log(caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p = progress(Pipeline(depth=40), live=False, stored=10, duplicates=2, dead=1, batches=3,
                 newest_received_at=now_ms() - 1000)
    with caplog.at_level(logging.INFO, logger="meteorit.consumer"):
        p.show(1234.6, 40)
    (record,) = [r for r in caplog.records if r.getMessage() == "progress"]
    assert record.name == "meteorit.consumer"
    assert (record.stored, record.duplicates, record.dead_letters, record.batches) == (10, 2, 1, 3)
    assert (record.events_per_s, record.queue_depth) == (1235, 40)
    assert 0.9 <= record.lag_s < 60
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("depth, in_hand, newest, lag", [
    (0, 0, 0, 0.0),  # caught up, even before anything was stored
    (0, 0, now_ms() - 3_600_000, 0.0),  # caught up: an hour-old event is not an hour of lag
    (None, 0, 0, None),  # nothing stored yet, queue unknown
    (5, 0, 0, None),
    (0, 1, 0, None),  # a batch in hand: not caught up
])
def test_lag(depth: int | None, in_hand: int, newest: int, lag: float | None) -> None:
    assert progress(Pipeline(depth, in_hand), live=False, newest_received_at=newest).lag(depth) == lag


def test_lag_behind_the_newest_stored_event() -> None:
    lag = progress(Pipeline(9, 1), live=False, newest_received_at=now_ms() - 3_600_000).lag(9)
    assert lag is not None and 3599 <= lag < 3700
    assert progress(Pipeline(9), live=False, newest_received_at=now_ms() + 60_000).lag(9) == 0.0  # a clock ahead


@pytest.mark.parametrize("sink_on_stdout", [False, True])
def test_the_summary_goes_to_stdout_unless_the_records_do(
        sink_on_stdout: bool, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    p = progress(Pipeline(0), live=False, sink_on_stdout=sink_on_stdout, stored=5, batches=2, duplicates=1,
                 dead=3)
    with caplog.at_level(logging.INFO, logger="meteorit.consumer"):
        p.summary()
    out, err = capsys.readouterr()
    text, other = (err, out) if sink_on_stdout else (out, err)
    assert other == ""
    assert text.startswith("meteorit-consumer: stored 5 events in 2 batches, 1 duplicates skipped, "
                           "3 dead letters, ") and text.endswith(" events/s\n")
    (record,) = [r for r in caplog.records if r.getMessage() == "consumer stopped"]
    assert (record.stored, record.batches, record.dead_letters) == (5, 2, 3) and record.seconds >= 0


def test_the_report_runs_every_interval_and_a_live_line_ends_its_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = Pipeline(depth=None, reads=3)

    async def report_until_cancelled() -> None:
        p = progress(pipeline, live=True)
        p.every = 0.01  # the live line's own 0.5 s, shortened for the test
        task = asyncio.create_task(p.run())
        await asyncio.wait_for(pipeline.enough.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(report_until_cancelled())
    err = capsys.readouterr().err
    assert err.count("\r\x1b[K") == pipeline.reads >= 3
    assert err.endswith("in hand 0\n")  # the stop's own lines start on a line of their own


def test_off_a_terminal_the_report_runs_every_stats_interval(caplog: pytest.LogCaptureFixture) -> None:
    pipeline = Pipeline(depth=0, reads=2)
    p = progress(pipeline, live=False, every=0.01)
    assert progress(Pipeline(0), live=True, every=0.01).every == 0.5  # a terminal: twice a second

    async def report_until_cancelled() -> None:
        task = asyncio.create_task(p.run())
        await asyncio.wait_for(pipeline.enough.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="meteorit.consumer"):
        asyncio.run(report_until_cancelled())
    lines = [r for r in caplog.records if r.getMessage() == "progress"]
    assert len(lines) == pipeline.reads and all(r.queue_depth == 0 and r.lag_s == 0 for r in lines)
