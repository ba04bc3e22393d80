"""Campaign status from the output folder alone: counts, rate, time left, failures, and
folders older runs left with only their parts and markers."""

import json
import shutil

import pytest

from shardlens.tracer.campaign import run_campaign, status
from shardlens.tracer.campaign import units as campaign_units
from shardlens.tracer.campaign.status import UnitFailure
from tests.tracer.test_campaign import write_campaign

# 16 rows in batches of 8: 2 atp units, then 2 extract units
SMALL = """name: small
model: {source: MODEL}
cluster: {backend: local, stages: 2}
data: {path: prompts.jsonl, batch_size: 8, limit: 16}
experiments:
  - {name: atp, kind: atp, points: z, over: [layer, head], positions: [22]}
  - {name: resid, kind: extract, points: "blocks.*.hook_resid_post"}
output: {path: out, plots: false}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The output folder of the small campaign, run to its end once (copy it to change it)."""
    folder = tmp_path_factory.mktemp("finished")
    run_campaign(write_campaign(folder, SMALL), progress=False)
    return folder / "out"


def events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_a_finished_campaign(finished):
    out = finished
    got = status(out)
    assert (got.name, got.state, got.finished, got.done, got.left) == ("small", "finished", True, 4, 0)
    assert [(e.name, e.kind, e.done, e.total, e.left) for e in got.experiments] == [("atp", "atp", 2, 2, 0), ("resid", "extract", 2, 2, 0)]
    seconds = [e["seconds"] for e in events(out) if e["event"] == "done"]
    assert len(seconds) == 4 and got.rate == pytest.approx(4 / sum(seconds))
    assert got.experiments[0].seconds_per_unit == pytest.approx(sum(seconds[:2]) / 2)
    assert got.eta_seconds == 0 and got.failures == () and got.unknown == () and got.verification is None
    assert got.describe().startswith(f"small: finished, 4 of 4 units done, {got.rate:.3g} units/s; last event ")


def test_status_needs_only_the_output_folder(tmp_path, finished):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(finished, elsewhere)  # no campaign file, data or checkpoint beside it
    got = status(elsewhere)
    assert (got.name, got.done, got.left, got.state) == ("small", 4, 0, "finished")


def kill_at(monkeypatch, unit_number, error):
    """Make the run raise `error` when it reaches its unit_number-th unit (from 0)."""
    real, calls = campaign_units._run_unit, {"units": 0}

    def dying(unit, *args, **kwargs):
        if calls["units"] == unit_number:
            raise error
        calls["units"] += 1
        real(unit, *args, **kwargs)

    monkeypatch.setattr(campaign_units, "_run_unit", dying)


def test_an_interrupted_run_counts_what_is_done_and_estimates_the_rest(tmp_path, monkeypatch):
    path = write_campaign(tmp_path, SMALL)
    kill_at(monkeypatch, 3, KeyboardInterrupt("killed"))
    with pytest.raises(KeyboardInterrupt):
        run_campaign(path, progress=False)
    got = status(tmp_path / "out")
    assert (got.state, got.finished, got.done, got.left) == ("unfinished", False, 3, 1)
    assert [(e.name, e.done, e.left) for e in got.experiments] == [("atp", 2, 0), ("resid", 1, 1)]
    resid = [e["seconds"] for e in events(tmp_path / "out") if e["event"] == "done" and e["experiment"] == "resid"]
    assert got.eta_seconds == pytest.approx(resid[0])  # 1 resid unit left, at the resid units' mean
    assert got.failures == ()  # an interrupt is no failure of the unit
    assert f", about {round(got.eta_seconds)} s left" in got.describe().splitlines()[0]


def test_an_extract_unit_whose_marker_is_missing_is_not_done(tmp_path, monkeypatch):
    path = write_campaign(tmp_path, SMALL)
    real = campaign_units.write_atomic

    def no_second_marker(target, write):
        if target.name == "b00001.json":
            raise KeyboardInterrupt("killed after the parts, before the marker")
        real(target, write)

    monkeypatch.setattr(campaign_units, "write_atomic", no_second_marker)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(path, progress=False)
    assert len(list((tmp_path / "out" / "resid").glob("hook=*/part-b00001*.parquet"))) == 2
    got = status(tmp_path / "out")
    assert [(e.name, e.done, e.left) for e in got.experiments] == [("atp", 2, 0), ("resid", 1, 1)]


def test_a_failed_unit_is_recorded_shown_and_cleared_by_a_rerun(tmp_path, monkeypatch):
    path = write_campaign(tmp_path, SMALL)
    boom = ValueError("boom at the second atp batch")
    kill_at(monkeypatch, 1, boom)
    with pytest.raises(ValueError) as raised:
        run_campaign(path, progress=False)
    assert raised.value is boom  # the error itself goes on to the caller
    got = status(tmp_path / "out")
    assert got.state == "failed" and got.done == 1 and got.left == 3
    [failure] = got.failures
    assert failure == UnitFailure("atp", 1, "ValueError", "boom at the second atp batch", failure.time)
    assert f"failed: atp batch 1 at {failure.time}: ValueError: boom at the second atp batch" in got.describe().splitlines()
    monkeypatch.undo()
    assert run_campaign(path, progress=False)["units_run_now"] == 3
    again = status(tmp_path / "out")
    assert (again.state, again.failures, again.done) == ("finished", (), 4)


def test_a_folder_with_only_parts_and_markers(tmp_path, finished):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "campaign.json").unlink()
    (out / "events.jsonl").unlink()
    got = status(out)
    assert got.name is None and got.left is None and got.rate is None and got.eta_seconds is None
    assert [(e.name, e.kind, e.done, e.total) for e in got.experiments] == [("atp", None, 2, None), ("resid", "extract", 2, None)]
    assert [note.split(" ")[1] for note in got.unknown] == ["campaign.json", "events.jsonl:"]
    assert got.describe().splitlines()[0] == f"{out}: finished, 4 of ? units done"
    assert "  atp         ?             2      ?        -" in got.describe().splitlines()


def test_a_line_cut_by_a_crash_is_skipped(tmp_path, finished):
    shutil.copytree(finished, tmp_path / "out")
    with open(tmp_path / "out" / "events.jsonl", "a") as log:
        log.write('{"event": "done", "time": "2')
    got = status(tmp_path / "out")
    assert got.done == 4 and got.rate == status(finished).rate


def test_json_holds_the_counts(finished):
    data = json.loads(json.dumps(status(finished).to_dict()))
    assert (data["state"], data["done"], data["left"]) == ("finished", 4, 0)
    assert [(e["name"], e["done"], e["left"]) for e in data["experiments"]] == [("atp", 2, 0), ("resid", 2, 0)]


def test_no_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no campaign output folder at {tmp_path / 'nothing'}"):
        status(tmp_path / "nothing")
