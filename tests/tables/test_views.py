"""HTML views (shardlens.tables.views) rendered by a real browser: the values and labels
read back from the page Chromium leaves, no console errors, a screenshot that is not blank."""

import html
import json
import re
from pathlib import Path

import pytest
import torch

import shardlens as sl
from shardlens.tables.views import Context, Heatmap, attention_view, contexts_view, grid_view
from tests.browser import needs_chromium, not_blank, render

MODEL = Path(sl.__file__).parent / "data" / "induction"
NETWORK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:|//)|https?://|//cdn""", re.IGNORECASE)


def signed_grid() -> Heatmap:
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 3
    values[1, 2] = float("nan")  # a cell not computed
    values[2, 0], values[2, 1] = float("inf"), float("-inf")  # a metric that overflowed
    return Heatmap(values, ["blocks.0.hook_z", "<!--<script>", "blocks.2.hook_z"], ["<b>", " cat", "&", "é", "</script>"],
                   title="a grid", row_title="hook point", col_title="pos")


def test_a_view_is_one_document_with_nothing_from_the_network(tmp_path):
    heatmap = signed_grid()
    view = grid_view(heatmap)
    assert view.html.startswith("<!doctype html>") and '<script type="application/json" id="sl-data">' in view.html
    assert not NETWORK.search(view.html), NETWORK.search(view.html)
    data = view.html.split('id="sl-data">')[1].split("</script>")[0]
    assert not set("<>&") & set(data)  # labels such as </script> or <!--<script> are escaped inside the data
    assert json.loads(data)["heatmaps"][0]["rows"][1] == "<!--<script>"
    assert view.save(tmp_path / "sub" / "grid.html").read_text() == view.html
    inline = view._repr_html_()
    assert inline.startswith("<iframe srcdoc=") and html.unescape(inline.split('"')[1]) == view.html


def test_a_bad_shape_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"values \[rows, cols\] = \[2, 3\].*shape \[3, 2\]"):
        Heatmap(torch.zeros(3, 2), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"a token label per position: 4; got 3"):
        attention_view({0: torch.zeros(2, 4, 4)}, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"one number of heads; got \[2, 3\]"):
        attention_view({0: torch.zeros(2, 4, 4), 1: torch.zeros(3, 4, 4)})
    for limit in (float("nan"), float("inf"), 0.0, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"limit \(the value of full colour\) must be a finite number > 0, or None"):
            Heatmap(torch.zeros(1, 1), ["a"], ["x"], limit=limit)


@needs_chromium
def test_grid_cells_labels_and_colours_read_back_from_the_page(tmp_path):
    heatmap = signed_grid()
    rendered = render(grid_view(heatmap).save(tmp_path / "grid.html"))
    assert rendered.console == []
    cells = rendered.cells()
    assert len(cells) == 15
    for cell in cells:
        row, col, value = int(cell.attrs["data-row"]), int(cell.attrs["data-col"]), float(cell.attrs["data-value"])
        expected = float(heatmap.values[row, col])
        where = f"{heatmap.rows[row]} / {heatmap.cols[col]}: "
        if (row, col) == (1, 2):
            assert value != value and cell.attrs["title"] == where + "not computed"
            continue
        if expected in (float("inf"), float("-inf")):
            assert value == expected and cell.attrs["title"] == where + str(value).replace("inf", "Infinity")
            continue
        assert value == float(f"{expected:.6g}")
        assert cell.attrs["title"] == where + f"{expected:#.4g}".rstrip(".").replace("e-0", "e-").replace("e+0", "e+"), cell.attrs
        red, _, blue = map(int, re.search(r"rgb\((\d+), (\d+), (\d+)\)", cell.attrs["style"]).groups())
        assert (red > blue) == (expected > 0)  # diverging: red above 0, blue below
    assert [e.text for e in rendered.elements("th", data_col=None)] == heatmap.cols
    assert [e.text for e in rendered.elements("th", data_row=None)] == heatmap.rows
    assert not_blank(rendered.screenshot)


@needs_chromium
def test_the_browser_reports_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><body><script>no_such_function();</script></body></html>")
    assert any("Uncaught ReferenceError: no_such_function is not defined" in line for line in render(page).console)


@pytest.fixture(scope="module")
def induction():
    """The shipped 2-layer model, a prompt, its cache of attention patterns, and the patterns
    Hugging Face's eager attention returns for it (output_attentions=True)."""
    import transformers

    model = sl.HookedModel.from_pretrained(MODEL)
    tokens = torch.tensor([[5, 17, 9, 30, 5, 17]])
    _, cache = model.run_with_cache(tokens, names_filter="blocks.*.attn.hook_pattern")
    reference = transformers.AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager")
    with torch.no_grad():
        attentions = reference(tokens, output_attentions=True).attentions  # per layer [batch, head, q, k]
    return tokens, cache, attentions


@needs_chromium
@pytest.mark.parametrize("fragment, layer, heads", [("", 0, None), ("layer=1&head=2", 1, [2])])
def test_attention_view_of_a_cache_shows_the_models_own_patterns(tmp_path, induction, fragment, layer, heads):
    tokens, cache, attentions = induction
    labels = ["A", " b", " c", " d", "A", " b"]
    rendered = render(cache.view(labels).save(tmp_path / "attention.html"), fragment)
    assert rendered.console == []
    n_heads = attentions[layer].shape[1]
    shown = [int(d.attrs["data-head"]) for d in rendered.elements("div", data_layer=str(layer))]
    assert shown == (heads or list(range(n_heads)))
    for cell in rendered.cells():
        assert cell.attrs["title"].startswith(f"{labels[int(cell.attrs['data-row'])]} / {labels[int(cell.attrs['data-col'])]}: ")
    expected = attentions[layer][0]  # [head, q, k]
    assert torch.allclose(cache[f"blocks.{layer}.attn.hook_pattern"][0], expected, atol=1e-5)
    values = torch.tensor([float(c.attrs["data-value"]) for c in rendered.cells()]).reshape(len(shown), 6, 6)
    assert torch.allclose(values, expected[shown], rtol=1e-5, atol=1e-7)
    assert [e.text for e in rendered.elements("th", data_col=None)][:6] == labels
    assert not_blank(rendered.screenshot)


def test_cache_view_without_patterns_names_what_it_needs():
    cache = sl.ActivationCache({"blocks.0.hook_resid_post": torch.zeros(1, 3, 4)})
    with pytest.raises(ValueError, match=r"names_filter='blocks\.\*\.attn\.hook_pattern'"):
        cache.view()
    patterns = sl.ActivationCache({"blocks.0.attn.hook_pattern": torch.zeros(1, 2, 3, 3)})
    with pytest.raises(ValueError, match=r"layers=\[1\]\): no pattern cached for layers \[1\]; cached: \[0\]"):
        patterns.view(layers=[1])
    with pytest.raises(ValueError, match=r"layers=\[\]\): name at least one layer; cached: \[0\]"):
        patterns.view(layers=[])


def test_cache_view_leaves_out_padding():
    pattern = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))  # [batch, head, q, k]
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # the second example left-padded
    cache = sl.ActivationCache({"blocks.0.attn.hook_pattern": pattern}, attention_mask=mask)
    view = cache.view(["p", "q", "x", "y"], batch=1)
    data = re.search(r'id="sl-data">(.*?)</script>', view.html).group(1)
    shown = json.loads(data)
    assert shown["tokens"] == ["x", "y"]
    assert torch.allclose(torch.tensor(shown["layers"][0]["heads"]), pattern[1][:, 2:, 2:], rtol=1e-5)


@needs_chromium
def test_contexts_view_colours_tokens_by_value(tmp_path):
    features = {
        "blocks.0.mlp.hook_post feature 3": [Context(["The", " cat", " sat"], [0.5, 2.25, None], "rank 0"),
                                             Context(["A", " dog"], [None, 1.125], "rank 1")],
        "blocks.0.mlp.hook_post feature 7": [Context(["x", "<y>"], [0.0, 3.5], "rank 0")],
    }
    page = contexts_view(features).save(tmp_path / "contexts.html")
    first, second = render(page), render(page, "feature=1")
    assert first.console == second.console == []
    tokens = first.elements("span", data_value=None)
    assert [t.text for t in tokens] == ["The", " cat", " sat", "A", " dog"]
    assert [t.attrs["data-value"] for t in tokens] == ["0.5", "2.25", "NaN", "NaN", "1.125"]
    assert tokens[1].attrs["title"] == '" cat": 2.250' and tokens[2].attrs["title"] == '" sat"'
    assert [e.text for e in first.elements("span") if e.attrs.get("class") == "sl-max"] == ["max 2.250", "max 1.125"]
    assert [(t.text, t.attrs["data-value"]) for t in second.elements("span", data_value=None)] == [("x", "0"), ("<y>", "3.5")]
    assert not_blank(first.screenshot)
