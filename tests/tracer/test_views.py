"""CellGrid.view: a sweep's or an attribution's grid as a heatmap, read back from the page Chromium renders."""

import html

import pytest
import torch

import shardlens as sl
from shardlens.tracer import attribution, patching
from shardlens.tracer.cells import CellGrid
from shardlens.tracer.demo import MODEL, induction_task
from tests.browser import needs_chromium, not_blank, render


@pytest.fixture(scope="module")
def task():
    model = sl.HookedModel.from_pretrained(MODEL)
    clean, corrupt, answer, wrong = induction_task(n=4)
    return model, clean, corrupt, sl.metrics.logit_diff(answer, wrong)


def read_grid(rendered) -> torch.Tensor:
    cells = rendered.cells()
    rows, cols = 1 + max(int(c.attrs["data-row"]) for c in cells), 1 + max(int(c.attrs["data-col"]) for c in cells)
    grid = torch.full((rows, cols), float("inf"), dtype=torch.float64)
    for c in cells:
        grid[int(c.attrs["data-row"]), int(c.attrs["data-col"])] = float(c.attrs["data-value"])
    return grid


@needs_chromium
def test_a_position_sweep_shows_its_grid_with_the_prompts_tokens(tmp_path, task):
    model, clean, corrupt, metric = task
    swept = patching.sweep(model, clean, corrupt, points="resid_pre", over=("layer", "pos"), metric=metric)
    tokens = [f"t{int(t)}" for t in clean[0]]
    rendered = render(swept.view(tokens).save(tmp_path / "sweep.html"))
    assert rendered.console == []
    effect = swept.grid.double() - float(metric(model(corrupt), None, corrupt))  # the corrupted run, computed here
    assert torch.allclose(read_grid(rendered), effect, rtol=1e-5, atol=1e-5)
    assert [e.text for e in rendered.elements("th", data_col=None)] == [f"{i} {t}" for i, t in enumerate(tokens)]
    assert [e.text for e in rendered.elements("th", data_row=None)] == list(swept.points)
    assert f"patching effect over ('layer', 'pos') (corrupted run: {swept.baseline:.4g})" in rendered.elements("title")[0].text
    assert not_blank(rendered.screenshot)


@needs_chromium
def test_a_head_attribution_labels_heads_and_shows_itself_inline(tmp_path, task):
    model, clean, corrupt, metric = task
    heads = attribution.atp(model, clean, corrupt, points="z", over=("layer", "head"), metric=metric)
    inline = heads._repr_html_()
    page = tmp_path / "heads.html"
    page.write_text(html.unescape(inline.split('srcdoc="')[1].split('"')[0]))  # the document the notebook's iframe shows
    rendered = render(page)
    assert rendered.console == []
    assert torch.allclose(read_grid(rendered), heads.grid.double(), rtol=1e-5, atol=1e-9)
    assert [e.text for e in rendered.elements("th", data_col=None)] == [f"H{h}" for h in range(heads.grid.shape[1])]


@needs_chromium
def test_cells_not_computed_show_as_such(tmp_path):
    grid = CellGrid(("blocks.0.sae.hook_latents",), ("layer", "feature"), torch.tensor([[1.5, float("nan"), -0.25]]))
    rendered = render(grid.view().save(tmp_path / "features.html"))
    assert [c.attrs["data-value"] for c in rendered.cells()] == ["1.5", "NaN", "-0.25"]
    assert rendered.cells()[1].attrs["title"] == "blocks.0.sae.hook_latents / 1: not computed"


def test_a_grid_of_patched_metrics_needs_its_baseline():
    with pytest.raises(ValueError, match=r"patched_metric=True\) needs the baseline .*; got baseline=None"):
        CellGrid(("blocks.0.hook_resid_pre",), ("layer", "pos"), torch.zeros(1, 3), patched_metric=True)


def test_tokens_must_fit_the_grid():
    grid = CellGrid(("blocks.0.hook_resid_pre",), ("layer", "pos"), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="a token per position: 3; got 2 tokens"):
        grid.view(["a", "b"])
    with pytest.raises(ValueError, match=r"labels positions; this grid is over \('layer', 'head'\)"):
        CellGrid(("blocks.0.attn.hook_z",), ("layer", "head"), torch.zeros(1, 3)).view(["a", "b", "c"])
