"""shardlens.progress: the reporter's modes, events, fields and throttling."""

import io
import json
import re
import time
from datetime import datetime

import pytest

from shardlens import progress


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_mode_writes_one_event_per_line_with_every_field():
    stream = io.StringIO()
    with progress.using("json", stream=stream, interval=0):
        with progress.task("load", "loading 3 stages", total=3, unit="stage") as task:
            for _ in range(3):
                task.advance()
    events = lines(stream)
    assert [(e["event"], e["done"]) for e in events] == [("start", 0), ("progress", 1), ("progress", 2), ("progress", 3), ("end", 3)]
    for event in events:
        assert (event["task"], event["desc"], event["total"], event["unit"]) == ("load", "loading 3 stages", 3, "stage")
        assert set(event) >= {"rate", "eta_s", "elapsed_s", "time"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
        datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert events[0]["rate"] is None and events[0]["eta_s"] is None  # nothing done yet: no rate, no time left
    assert events[1]["rate"] > 0 and events[1]["eta_s"] == pytest.approx(2 / events[1]["rate"], rel=0.01, abs=0.1)
    assert events[-1]["eta_s"] == 0.0 and events[-1]["ok"] is True
    assert "ok" not in events[1]


def test_the_rate_counts_only_this_runs_units():
    stream = io.StringIO()
    with progress.using("json", stream=stream, interval=0):
        task = progress.task("campaign", "c", total=10, unit="unit", initial=6)
        time.sleep(0.1)
        task.advance(2)
        task.close()
    start, step, end = lines(stream)
    assert (start["done"], step["done"], end["done"]) == (6, 8, 8)
    assert step["rate"] == pytest.approx(2 / step["elapsed_s"], rel=0.05)  # 2 units this run, not 8
    assert step["eta_s"] == pytest.approx(2 / step["rate"], abs=0.1)


def test_progress_events_are_throttled_except_the_last():
    stream = io.StringIO()
    with progress.using("json", stream=stream, interval=60):
        with progress.task("write", "rows", total=5, unit="row") as task:
            for _ in range(5):
                task.advance()
        with progress.task("write", "more rows", total=10, unit="row") as task:
            task.advance(4)
    assert [(e["event"], e["desc"], e["done"]) for e in lines(stream)] == [
        ("start", "rows", 0), ("progress", "rows", 5), ("end", "rows", 5), ("start", "more rows", 0), ("end", "more rows", 4),
    ]


def test_a_task_whose_block_raised_ends_not_ok_and_a_second_close_does_nothing():
    stream = io.StringIO()
    with progress.using("json", stream=stream):
        with pytest.raises(RuntimeError):
            with progress.task("load", "x", total=None, unit="stage") as task:
                raise RuntimeError("stage 1 failed")
        task.close()
    start, end = lines(stream)
    assert (end["event"], end["ok"], end["total"], end["eta_s"]) == ("end", False, None, None)


def test_quiet_mode_prints_nothing(capsys):
    stream = io.StringIO()
    with progress.using("quiet", stream=stream):
        with progress.task("campaign", "c", total=2, unit="unit") as task:
            task.advance(2)
    assert stream.getvalue() == "" and capsys.readouterr() == ("", "")


def test_bar_mode_shows_the_desc_count_unit_rate_and_time_left():
    stream = io.StringIO()
    with progress.using("bar", stream=stream):
        with progress.task("load", "loading 4 stages", total=4, unit="stage") as task:
            for _ in range(4):
                task.advance()
    final = stream.getvalue().split("\r")[-1]
    assert final.startswith("loading 4 stages: 100%") and "4/4 [" in final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+stage/s\]", final), final  # elapsed<time left, rate in stages per second
    assert "{" not in stream.getvalue()  # no JSON in bar mode


def test_json_goes_to_stderr_by_default_and_stdout_stays_clean(capsys):
    with progress.using("json"):
        with progress.task("campaign", "c", total=1, unit="unit") as task:
            task.advance()
    out, err = capsys.readouterr()
    assert out == "" and [json.loads(line)["event"] for line in err.splitlines()] == ["start", "progress", "end"]


def test_using_restores_the_mode_and_bad_values_are_refused():
    with progress.using("quiet"):
        with progress.using("json"):
            assert progress.mode() == "json"
        assert progress.mode() == "quiet"
    with pytest.raises(ValueError, match="progress mode must be one of bar, quiet, json; got 'loud'"):
        progress.configure("loud")
    with pytest.raises(ValueError, match="total >= 0"):
        progress.task("load", "x", total=-1, unit="stage")


def test_json_lines_keep_a_stream_one_json_object_per_line():
    out = io.StringIO()
    lines = progress.JsonLines(out)
    lines.write('{"event": "start", "task": "load"}\nToken authentication is enabled')
    lines.write(" for this Ray cluster.\n\n  indented warning\n[1, 2]\nunfinished")
    lines.close()  # the unfinished last line is written too
    lines.write("after close\n")  # passes through unchanged
    written = out.getvalue().splitlines()
    assert written[-1] == "after close"
    events = [json.loads(line) for line in written[:-1]]
    assert events[0] == {"event": "start", "task": "load"}
    assert [(e["event"], e["message"]) for e in events[1:]] == [
        ("log", "Token authentication is enabled for this Ray cluster."), ("log", "  indented warning"),
        ("log", "[1, 2]"), ("log", "unfinished"),  # JSON that is no object is a line like any other
    ]
    assert all(e["time"].endswith("Z") for e in events[1:])
