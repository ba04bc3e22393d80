"""Campaign files: schema errors with lines, runs, and resuming after a kill."""

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.tracer.campaign import units as campaign_module
from shardlens.tracer.campaign import CampaignError, load_campaign, run_campaign

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "induction"


def write_campaign(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "prompts.jsonl", folder / "prompts.jsonl")
    model = Path(sl.__file__).parent / "data" / "induction"
    path = folder / "campaign.yaml"
    path.write_text(text.replace("MODEL", str(model)))
    return path


GOOD = """name: t
model: {source: MODEL}
cluster: {backend: local, stages: 2}
data: {path: prompts.jsonl, batch_size: 8, limit: 24}
metric: {kind: logit_diff}
experiments:
  - {name: heads, kind: sweep, points: z, over: [layer, head], positions: [22]}
  - {name: atp, kind: atp, points: z, over: [layer, head], positions: [22]}
  - {name: ig, kind: ig, points: resid_pre, steps: 4}
  - {name: resid, kind: extract, points: "blocks.*.hook_resid_post", layout: token}
output: {path: out, plots: true}
"""


@pytest.mark.parametrize("edit, message", [
    (("cluster: {backend: local, stages: 2}", "cluster: {backend: local, stagse: 2}"), r"campaign.yaml:3: unknown key 'stagse' in cluster"),
    (("batch_size: 8", "batch_size: eight"), r"campaign.yaml:4: data.batch_size must be int"),
    (("{kind: logit_diff}", "{kind: accuracy}"), r"campaign.yaml:5: metric.kind must be one of"),
    (("  - {name: ig, kind: ig,", "  - {name: ig, kind: tune,"), r"campaign.yaml:9: experiment.kind must be one of"),
    (("output: {path: out, plots: true}\n", ""), r"campaign.yaml:1: the campaign lacks 'output'"),
    (("{name: atp, kind: atp", "{name: heads, kind: atp"), r"campaign.yaml:8: two experiments are named 'heads'"),
    (("model: {source: MODEL}", "model: [MODEL]"), r"campaign.yaml:2: model must be dict"),
])
def test_schema_errors_name_the_line_and_key(tmp_path, edit, message):
    path = write_campaign(tmp_path, GOOD.replace(*edit))
    with pytest.raises(CampaignError, match=message):
        load_campaign(path)


def visible_dataset(out: Path) -> dict:
    """Every visible Parquet part under `out`, read back, by relative path."""
    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.rglob("*.parquet")) if not p.name.startswith(".")}


def test_a_run_writes_the_dataset_summary_and_plots(tmp_path):
    path = write_campaign(tmp_path, GOOD)
    summary = run_campaign(path, progress=False)
    out = tmp_path / "out"
    assert summary["units"] == 12 and summary["units_run_now"] == 12
    assert summary["experiments"]["heads"]["top"]["point"] == "blocks.1.attn.hook_z"  # the induction layer
    assert (out / "summary.md").read_text().startswith("# t")
    assert {p.name for p in (out / "plots").iterdir()} == {"heads.png", "atp.png", "ig.png"}
    assert len(list((out / "heads").glob("part-*.parquet"))) == 3
    cache = sl.read_cache(out / "resid")
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] and cache.examples.tolist() == list(range(24))
    again = run_campaign(path, progress=False)
    assert again["units_run_now"] == 0


@pytest.mark.parametrize("die_after", [0, 2, 5, 9, 11])
def test_a_killed_run_resumes_to_the_uninterrupted_dataset(tmp_path, monkeypatch, die_after):
    whole = write_campaign(tmp_path / "whole", GOOD)
    run_campaign(whole, progress=False)
    expected = visible_dataset(tmp_path / "whole" / "out")

    killed = write_campaign(tmp_path / "killed", GOOD)
    real_unit, real_write = campaign_module._run_unit, campaign_module.write_atomic
    calls = {"units": 0, "writes": 0}

    def dying_write(path, write):
        calls["writes"] += 1
        # units 0-8 write one part each (sweep, atp, ig); extract units (9-11) write their
        # marker after the workers wrote the parts: die while writing either
        if calls["units"] == die_after and calls["writes"] == 1:
            (path.parent).mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    def counting_unit(*args, **kwargs):
        calls["writes"] = 0
        real_unit(*args, **kwargs)
        calls["units"] += 1

    monkeypatch.setattr(campaign_module, "write_atomic", dying_write)
    monkeypatch.setattr(campaign_module, "_run_unit", counting_unit)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(killed, progress=False)
    monkeypatch.setattr(campaign_module, "write_atomic", real_write)
    monkeypatch.setattr(campaign_module, "_run_unit", real_unit)
    if die_after >= 9:  # the killed extract unit's parts are all there, but not its marker
        assert len(list((tmp_path / "killed" / "out" / "resid").glob(f"hook=*/part-b{die_after - 9:05d}-*.parquet"))) == 2
    summary = run_campaign(killed, progress=False)
    assert summary["units_run_now"] == 12 - die_after
    got = visible_dataset(tmp_path / "killed" / "out")
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].equals(expected[name]), name
    markers = sorted((tmp_path / "killed" / "out" / "resid" / "_done").iterdir())
    assert [m.name for m in markers] == ["b00000.json", "b00001.json", "b00002.json"]


def test_workers_that_do_not_share_the_output_folder_leave_extract_writes_to_the_driver(tmp_path, monkeypatch):
    extract_only = GOOD.split("experiments:")[0] + """experiments:
  - {name: resid, kind: extract, points: "blocks.*.hook_resid_post", layout: token}
output: {path: out, plots: false}
"""
    run_campaign(write_campaign(tmp_path / "shared", extract_only), progress=False)
    monkeypatch.setattr(sl.Tracer, "write_cache", lambda *a, **k: pytest.fail("the workers wrote"))
    monkeypatch.setattr(sl.Tracer, "shares", lambda self, path: False)  # as workers on other machines
    run_campaign(write_campaign(tmp_path / "apart", extract_only), progress=False)
    by_workers, by_driver = (sl.read_cache(tmp_path / where / "out" / "resid") for where in ("shared", "apart"))
    assert sorted(by_workers) == sorted(by_driver) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert by_workers.examples.tolist() == by_driver.examples.tolist() == list(range(24))
    for name in by_workers:
        assert torch.equal(by_workers[name], by_driver[name]), name
    parts = sorted(p.name for p in (tmp_path / "apart" / "out" / "resid").glob("hook=blocks.0.hook_resid_post/*"))
    assert parts == ["part-b00000.parquet", "part-b00001.parquet", "part-b00002.parquet"]
    assert len(list((tmp_path / "apart" / "out" / "resid" / "_done").iterdir())) == 3


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads file names from /proc")
def test_every_part_reaches_the_disk_before_its_name_appears(tmp_path, fsyncs):
    seen = fsyncs
    run_campaign(write_campaign(tmp_path, GOOD), progress=False)
    out = tmp_path / "out"
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.suffix in (".parquet", ".json") and p.parent != out]
    published = [os.path.join(out, os.path.dirname(p), f".{os.path.basename(p)}.tmp") for p in files]
    assert len(files) == 15 + 3  # 9 driver parts, 3 extract units x 2 hook points, 3 markers
    assert sorted(published) == sorted(path for path, _, _ in seen)
    assert all(whole and not visible for _, whole, visible in seen)


def test_data_without_a_needed_field_is_refused_before_any_work(tmp_path):
    path = write_campaign(tmp_path, GOOD.replace("batch_size: 8, limit: 24", "batch_size: 8, limit: 24, corrupt: corrupted"))
    with pytest.raises(CampaignError, match=r"no field 'corrupted' \(data.corrupt\)"):
        run_campaign(path, progress=False)
    assert not (tmp_path / "out" / "heads").exists()


def test_a_campaign_runs_on_a_hooked_model_as_on_a_tracer(tmp_path, monkeypatch):
    on_tracer = run_campaign(write_campaign(tmp_path / "tracer", GOOD), progress=False)
    model = sl.HookedModel.from_pretrained(Path(sl.__file__).parent / "data" / "induction")
    monkeypatch.setattr(sl.Tracer, "from_pretrained", lambda *a, **k: pytest.fail("the campaign started its own cluster"))
    on_model = run_campaign(write_campaign(tmp_path / "model", GOOD), progress=False, runner=model)
    assert on_model["units_run_now"] == on_tracer["units_run_now"] == 12
    tracer_data, model_data = visible_dataset(tmp_path / "tracer" / "out"), visible_dataset(tmp_path / "model" / "out")
    assert sorted(tracer_data) == sorted(model_data)
    for part, table in tracer_data.items():
        if not part.startswith("resid"):  # the sweep / attribution grids
            assert torch.allclose(torch.tensor(table["value"].to_numpy()), torch.tensor(model_data[part]["value"].to_numpy()), atol=1e-4), part
    cache, again = sl.read_cache(tmp_path / "tracer" / "out" / "resid"), sl.read_cache(tmp_path / "model" / "out" / "resid")
    assert all(torch.allclose(cache[name], again[name], atol=1e-5) for name in cache)


def test_summary_html_shows_each_grid_and_the_run(tmp_path):
    import json

    from tests.browser import CHROMIUM, not_blank, render

    path = write_campaign(tmp_path, GOOD.replace("limit: 24", "limit: 8"))
    run_campaign(path, progress=False)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    page = (out / "summary.html").read_text()
    assert "http://" not in page and "https://" not in page
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (Debian's chromium package; .ci/run installs it)")
    rendered = render(out / "summary.html")
    assert rendered.console == []
    tables = [e for e in rendered.elements("div") if e.attrs.get("class") == "sl-heatmap"]
    assert len(tables) == 3  # heads, atp, ig; extract is a line
    cells = rendered.cells()
    by_grid: list = []
    for cell in cells:  # in page order: a grid's cells, then the next grid's
        if cell.attrs["data-row"] == cell.attrs["data-col"] == "0":
            by_grid.append({})
        by_grid[-1][int(cell.attrs["data-row"]), int(cell.attrs["data-col"])] = float(cell.attrs["data-value"])
    for name, shown in zip(["heads", "atp", "ig"], by_grid):
        grid = torch.tensor(summary["experiments"][name]["grid"], dtype=torch.float64)
        read = torch.tensor([[shown[r, c] for c in range(grid.shape[1])] for r in range(grid.shape[0])], dtype=torch.float64)
        assert torch.allclose(read, grid, rtol=1e-5, atol=1e-12), name
    rows = [e.text for e in rendered.elements("th", data_row=None)]
    assert rows == summary["experiments"]["heads"]["points"] * 2 + summary["experiments"]["ig"]["points"]
    links = {e.attrs["href"] for e in rendered.elements("a")}
    assert {"./heads/", "./atp/", "./ig/", "./resid/", "summary.md", "summary.json"} <= links
    text = rendered.elements("body")[0].text
    assert f"shardlens {sl.__version__}, torch {torch.__version__}" in text and "backend local, 2 stages" in text
    assert "4 run now of 4" in text and "2 hook points: blocks.0.hook_resid_post, blocks.1.hook_resid_post" in text
    assert not_blank(rendered.screenshot)


def test_a_report_that_fails_leaves_the_finished_campaign_finished(tmp_path, monkeypatch):
    from shardlens.tracer.campaign import report

    def broken(*args, **kwargs):
        raise ValueError("a Heatmap's limit must be a finite number > 0")

    monkeypatch.setattr(report, "html_report", broken)
    path = write_campaign(tmp_path, GOOD.replace("limit: 24", "limit: 8"))
    with pytest.warns(RuntimeWarning, match=r"summary.html was not written \(ValueError: a Heatmap's limit .*\); summary.md and summary.json were"):
        summary = run_campaign(path, progress=False)
    assert summary["units_run_now"] == 4 and (tmp_path / "out" / "summary.md").is_file() and not (tmp_path / "out" / "summary.html").exists()
