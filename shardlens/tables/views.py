"""Views: self-contained HTML documents of attention patterns, grids of cells and top contexts.

Each view is one HTML document with its CSS, its script and its data inline (the data as
JSON in a ``<script type="application/json">``), so it opens with no network, from a file or
inline in a notebook. One heatmap core draws every picture: rows x columns of cells, a
diverging colour scale centred on 0 for signed values (red above, blue below) and a
sequential one for attention patterns and activations, labels on both axes, and on hover
the row, column and value, both in a tooltip and in each cell's ``title``. Every cell
carries ``data-row``, ``data-col`` and ``data-value`` (the value as embedded, ``NaN`` for a
cell not computed), so the rendered page holds the numbers it shows.

Values are embedded to 6 significant digits (about float32's precision); titles and
tooltips print 4.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import Tensor

DIGITS = 6  # significant digits of the values a view embeds


@dataclass(frozen=True)
class View:
    """One self-contained HTML document; shows itself inline in Jupyter.

    Example:
        >>> from shardlens.tables import attention_view
        >>> view = attention_view({0: pattern}, ["The", " cat", " sat"])   # pattern [head, q_pos, k_pos]
        >>> view.save("attention.html")
        PosixPath('attention.html')
    """

    html: str
    title: str

    def __post_init__(self) -> None:
        if not self.html.lstrip().lower().startswith("<!doctype html>"):
            raise ValueError(f"View.html must be a whole HTML document starting with <!doctype html>; got {self.html[:40]!r}")

    def _repr_html_(self) -> str:
        # An iframe of its own: the scripts and element ids of several views in one notebook never meet.
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" title="{html.escape(self.title, quote=True)}" '
                'style="width: 100%; height: 640px; border: 1px solid #ddd; resize: vertical;"></iframe>')

    def save(self, path: Union[str, Path]) -> Path:
        """Write the document to `path` (UTF-8) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path


@dataclass(frozen=True)
class Heatmap:
    """A matrix to draw: values [rows, cols] with a label per row and per column.

    Args:
        signed: a diverging scale centred on 0 (effects, attributions); else sequential from
            0 (attention patterns, activations).
        limit: the value of the scale's full colour (default: the largest |value|).
    """

    values: Tensor
    rows: Sequence[str]
    cols: Sequence[str]
    title: str = ""
    row_title: str = ""
    col_title: str = ""
    signed: bool = True
    limit: Optional[float] = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or tuple(self.values.shape) != (len(self.rows), len(self.cols)):
            raise ValueError(f"a Heatmap needs values [rows, cols] = [{len(self.rows)}, {len(self.cols)}] (one label each); "
                             f"got values of shape {list(self.values.shape)}")
        if self.limit is not None and not (isinstance(self.limit, (int, float)) and math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"a Heatmap's limit (the value of full colour) must be a finite number > 0, or None; got {self.limit!r}")

    def spec(self) -> dict:
        """What the page's script draws: labels, values (None where NaN), scale."""
        return {"title": self.title, "rows": [str(r) for r in self.rows], "cols": [str(c) for c in self.cols],
                "rowTitle": self.row_title, "colTitle": self.col_title, "signed": self.signed, "limit": self.limit,
                "values": rounded(self.values)}


def number(value: Optional[float]) -> Union[float, str, None]:
    """A value as the page's data holds it: a float to DIGITS significant digits, None for NaN
    (or no value), "Infinity" / "-Infinity" for the infinities (JSON has no such numbers)."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(f"{value:.{DIGITS}g}")


def rounded(values: Tensor) -> Any:
    """A tensor as nested lists of `number`s."""
    flat = [number(v) for v in values.detach().double().flatten().tolist()]

    def nest(items: list, shape: Sequence[int]) -> list:
        if len(shape) <= 1:
            return items
        step = math.prod(shape[1:])
        return [nest(items[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]

    return nest(flat, list(values.shape)) if values.ndim else flat[0]


# ---------------------------------------------------------------------- the views


def grid_view(heatmap: Heatmap) -> View:
    """One heatmap on a page of its own (a patching or attribution grid)."""
    return page(heatmap.title or "grid", [replace(heatmap, title="")])  # the page's title is the heatmap's


def page(title: str, parts: Sequence[Union[str, Heatmap]]) -> View:
    """A page of HTML fragments (given as trusted HTML: escape what you put in them) and
    heatmaps, in order; the campaign report is one."""
    body, specs = [], []
    for part in parts:
        if isinstance(part, Heatmap):
            body.append(f'<div class="sl-heatmap" data-index="{len(specs)}"></div>')
            specs.append(part.spec())
        else:
            body.append(part)
    return _document(title, "\n".join(body), {"kind": "page", "heatmaps": specs})


def attention_view(patterns: Mapping[Any, Tensor], tokens: Optional[Sequence[str]] = None, *, title: str = "attention patterns") -> View:
    """Attention patterns per layer and head, queries as rows and keys as columns, labelled
    with the tokens; a layer and a head selector (all heads side by side by default).

    Args:
        patterns: layer (an int or a hook name) -> [head, q_pos, k_pos].
        tokens: a label per position (default "0", "1", ...).

    The page opens on the layer and head its URL's fragment names (``view.html#layer=1&head=2``;
    layer is an index into `patterns`), else the first layer's heads.
    """
    if not patterns:
        raise ValueError("attention_view needs at least one layer's pattern [head, q_pos, k_pos]; got none")
    layers = []
    for layer, pattern in patterns.items():
        if pattern.ndim != 3 or pattern.shape[1] != pattern.shape[2]:
            raise ValueError(f"attention_view needs each pattern as [head, q_pos, k_pos]; layer {layer} has shape {list(pattern.shape)}")
        layers.append({"name": f"layer {layer}" if isinstance(layer, int) else str(layer), "heads": rounded(pattern)})
    n_pos = next(iter(patterns.values())).shape[-1]
    labels = _labels(tokens, n_pos, "attention_view")
    if any(p.shape[-1] != n_pos for p in patterns.values()):
        raise ValueError(f"attention_view needs one sequence length; got {sorted({p.shape[-1] for p in patterns.values()})}")
    if len({p.shape[0] for p in patterns.values()}) > 1:
        raise ValueError(f"attention_view needs one number of heads; got {sorted({p.shape[0] for p in patterns.values()})}")
    body = ('<div class="sl-controls"><label>layer <select id="sl-layer"></select></label> '
            '<label>head <select id="sl-head"></select></label></div><div id="sl-maps"></div>')
    return _document(title, body, {"kind": "attention", "tokens": labels, "layers": layers})


@dataclass(frozen=True)
class Context:
    """One context of a feature: its tokens and the feature's value at each (None: not recorded)."""

    tokens: Sequence[str]
    values: Sequence[Optional[float]]
    label: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.values):
            raise ValueError(f"a Context needs a value (or None) per token; got {len(self.tokens)} tokens and {len(self.values)} values")


def contexts_view(features: Mapping[str, Sequence[Context]], *, title: str = "top contexts") -> View:
    """The top-activating contexts of latents or neurons: a feature selector, and for each
    context its tokens coloured by the feature's value (value in the title) and its largest value.

    Args:
        features: a feature's name ("blocks.1.mlp.hook_post feature 3") -> its contexts, best first.

    The page opens on the feature its URL's fragment names (``view.html#feature=2``, an
    index into `features`), else the first.
    """
    if not features:
        raise ValueError("contexts_view needs at least one feature's contexts; got none")
    groups = []
    for name, contexts in features.items():
        rows = []
        for context in contexts:
            recorded = [v for v in context.values if v is not None and not math.isnan(v)]
            rows.append({"label": context.label, "tokens": [str(t) for t in context.tokens], "values": [number(v) for v in context.values],
                         "max": number(max(recorded, default=None))})
        groups.append({"name": str(name), "contexts": rows})
    body = '<div class="sl-controls"><label>feature <select id="sl-feature"></select></label></div><div id="sl-contexts"></div>'
    return _document(title, body, {"kind": "contexts", "features": groups})


def top_contexts_view(table: Any, *, decode: Optional[Callable[[Sequence[int]], Sequence[str]]] = None,
                      title: str = "top contexts") -> View:
    """The contexts view of a top_contexts experiment's table (top_contexts.parquet: hook,
    feature, rank, activation, example, pos, start, tokens); only the activating token of
    each context has a recorded value.

    Args:
        decode: token ids -> a label per token (shardlens view decodes each id alone with the
            campaign's tokenizer); default the ids.
    """
    decode = decode or (lambda ids: [str(i) for i in ids])
    features: dict[str, list[Context]] = {}
    for row in table.to_pylist():
        ids = row["tokens"]
        values = [row["activation"] if i == row["pos"] - row["start"] else None for i in range(len(ids))]
        label = f"rank {row['rank']} · example {row['example']} · pos {row['pos']}"
        features.setdefault(f"{row['hook']} feature {row['feature']}", []).append(Context(list(decode(ids)), values, label))
    return contexts_view(features, title=title)


def _labels(tokens: Optional[Sequence[str]], n: int, what: str) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"{what} needs a token label per position: {n}; got {len(tokens)} tokens")
    return [str(t) for t in tokens]


# ---------------------------------------------------------------------- the document


def _document(title: str, body: str, data: dict) -> View:
    """The HTML document: the CSS, the body, the data as JSON and the script that draws it."""
    # No "<", ">" or "&" inside the script element: a label such as "</script>" or "<!--<script>"
    # would end it early or keep it open; JSON reads the escapes back as the same characters.
    payload = json.dumps(data, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
<div id="sl-tooltip" hidden></div>
<script type="application/json" id="sl-data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    return View(text, title)


_CSS = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; } h2 { font-size: 15px; margin: 20px 0 6px; }
table.sl-grid { border-collapse: collapse; margin: 4px 12px 12px 0; }
table.sl-grid td.sl-cell { padding: 0; border: 1px solid #fff; }
table.sl-grid th { font-weight: normal; font-size: 10px; white-space: pre; color: #444; }
table.sl-grid th.sl-col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; padding: 2px 0; }
table.sl-grid th.sl-row { text-align: right; padding-right: 4px; }
table.sl-grid caption { text-align: left; font-weight: bold; padding: 2px 0; white-space: nowrap; }
.sl-axis { font-size: 10px; color: #777; }
.sl-heads { display: flex; flex-wrap: wrap; align-items: flex-start; }
.sl-context { margin: 3px 0; white-space: pre; font-family: ui-monospace, monospace; }
.sl-context .sl-tok { padding: 1px 0; border-radius: 2px; }
.sl-context .sl-max { display: inline-block; width: 7em; color: #555; }
.sl-context .sl-label { color: #999; font-size: 11px; margin-left: 8px; }
#sl-tooltip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 3px 6px;
  border-radius: 3px; font-size: 12px; white-space: pre; z-index: 10; }
table.sl-meta td { padding: 1px 12px 1px 0; vertical-align: top; }
"""

# The heatmap core (colour, cell, heatmap, tooltip) and the three kinds of page drawn with it.
_SCRIPT = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("sl-data").textContent);
  const num = (v) => typeof v === "string" ? Number(v) : v;  // "Infinity" / "-Infinity": JSON has no such numbers
  const mix = (t, c) => Math.round(255 + (c - 255) * t);
  function colour(v, limit, signed) {
    if (v === null) return "#eeeeee";
    v = num(v);
    const t = limit > 0 ? Math.max(-1, Math.min(1, v / limit)) : 0;
    const c = !signed ? [8, 48, 107] : t >= 0 ? [178, 24, 43] : [33, 102, 172];
    const a = Math.abs(t);
    return "rgb(" + mix(a, c[0]) + "," + mix(a, c[1]) + "," + mix(a, c[2]) + ")";
  }
  const shown = (v) => v === null ? "not computed" : Number(v).toPrecision(4);  // "Infinity" as itself
  function largest(values) {
    let m = 0;
    for (const v of values.flat()) if (v !== null && isFinite(num(v))) m = Math.max(m, Math.abs(num(v)));
    return m;
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  // A cell: its value in data-value and title, coloured on the scale.
  function cell(tag, cls, row, col, v, limit, signed, where) {
    const e = el(tag, cls);
    e.dataset.row = row; e.dataset.col = col;
    e.dataset.value = v === null ? "NaN" : String(v);
    e.title = where + ": " + shown(v);
    e.style.background = colour(v, limit, signed);
    return e;
  }
  function heatmap(container, spec) {
    const limit = spec.limit !== null && spec.limit !== undefined ? spec.limit : largest(spec.values);
    const size = Math.max(6, Math.min(24, Math.floor(480 / Math.max(spec.cols.length, 1))));
    const table = el("table", "sl-grid");
    if (spec.title) table.appendChild(el("caption", "", spec.title));
    const head = el("tr");
    head.appendChild(el("th", "sl-axis", spec.rowTitle + (spec.colTitle ? " \\ " + spec.colTitle : "")));
    spec.cols.forEach((label, j) => { const th = el("th", "sl-col", label); th.dataset.col = j; head.appendChild(th); });
    table.appendChild(head);
    spec.values.forEach((values, i) => {
      const tr = el("tr");
      const th = el("th", "sl-row", spec.rows[i]); th.dataset.row = i; tr.appendChild(th);
      values.forEach((v, j) => {
        const td = cell("td", "sl-cell", i, j, v, limit, spec.signed, spec.rows[i] + " / " + spec.cols[j]);
        td.style.width = td.style.height = size + "px"; td.style.minWidth = size + "px";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    container.appendChild(table);
    const sign = spec.signed ? "−" + shown(limit) + " (blue) to +" : "0 (white) to ";
    container.appendChild(el("div", "sl-axis sl-scale", "colour scale: " + sign + shown(limit) + (spec.signed ? " (red)" : " (dark blue)")));
    return table;
  }
  // One tooltip for the page: the hovered cell's title.
  const tip = document.getElementById("sl-tooltip");
  document.addEventListener("mousemove", (event) => {
    const target = event.target.closest ? event.target.closest("[data-value]") : null;
    tip.hidden = !target;
    if (target) { tip.textContent = target.title; tip.style.left = event.clientX + 12 + "px"; tip.style.top = event.clientY + 12 + "px"; }
  });
  function fragment() {
    const found = {};
    for (const part of location.hash.slice(1).split("&")) {
      const [k, v] = part.split("=");
      try { if (k) found[k] = decodeURIComponent(v || ""); } catch (error) { /* a malformed "%": not a selection */ }
    }
    return found;
  }
  function remember(hash) {  // the selection in the URL, where the page may change it (not in a notebook's srcdoc)
    try { history.replaceState(null, "", hash); } catch (error) { /* about:srcdoc */ }
  }
  function select(id, options, chosen, onchange) {
    const s = document.getElementById(id);
    options.forEach(([value, label]) => { const o = el("option", "", label); o.value = value; s.appendChild(o); });
    s.value = options.some(([value]) => value === chosen) ? chosen : options[0][0];
    s.addEventListener("change", onchange);
    return s;
  }

  function page() {
    document.querySelectorAll(".sl-heatmap").forEach((div) => heatmap(div, data.heatmaps[Number(div.dataset.index)]));
  }

  function attention() {
    const want = fragment();
    const layer = select("sl-layer", data.layers.map((l, i) => [String(i), l.name]), want.layer, draw);
    const heads = data.layers[0].heads.map((h, i) => [String(i), "head " + i]);
    const head = select("sl-head", [["all", "all heads"]].concat(heads), want.head, draw);
    function draw() {
      const maps = document.getElementById("sl-maps");
      maps.replaceChildren();
      const chosen = data.layers[Number(layer.value)];
      const box = el("div", "sl-heads");
      chosen.heads.forEach((values, h) => {
        if (head.value !== "all" && Number(head.value) !== h) return;
        const div = el("div"); div.dataset.layer = layer.value; div.dataset.head = h;
        heatmap(div, {title: chosen.name + " head " + h, rows: data.tokens, cols: data.tokens, values: values,
                      rowTitle: "query", colTitle: "key", signed: false, limit: 1});
        box.appendChild(div);
      });
      maps.appendChild(box);
      remember("#layer=" + layer.value + "&head=" + head.value);
    }
    draw();
  }

  function contexts() {
    const want = fragment();
    const feature = select("sl-feature", data.features.map((f, i) => [String(i), f.name]), want.feature, draw);
    function draw() {
      const box = document.getElementById("sl-contexts");
      box.replaceChildren();
      const group = data.features[Number(feature.value)];
      const limit = largest(group.contexts.map((c) => c.values));
      const signed = group.contexts.some((c) => c.values.some((v) => v !== null && num(v) < 0));  // else white to blue
      group.contexts.forEach((context, i) => {
        const line = el("div", "sl-context"); line.dataset.row = i;
        line.appendChild(el("span", "sl-max", context.max === null ? "-" : "max " + shown(context.max)));
        context.tokens.forEach((token, j) => {
          const span = cell("span", "sl-tok", i, j, context.values[j], limit, signed, JSON.stringify(token));
          if (context.values[j] === null) { span.style.background = "transparent"; span.title = JSON.stringify(token); }
          span.textContent = token;
          line.appendChild(span);
        });
        line.appendChild(el("span", "sl-label", context.label));
        box.appendChild(line);
      });
      remember("#feature=" + feature.value);
    }
    draw();
  }

  ({page: page, attention: attention, contexts: contexts})[data.kind]();
})();
"""
