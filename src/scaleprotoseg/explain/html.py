"""Small, dependency-free HTML building blocks for the static report: escaping, tables of labelled columns with units
(:class:`Column`, :func:`data_table`), figures that enlarge on a click (CSS only), a generic renderer for JSON results
(a mapping of scalars or a list of rows becomes a table) and the page with its inline CSS. No table cell ever shows
raw JSON: lists and mappings are written as text (``a, b`` and ``key: value; ...``)."""

from __future__ import annotations

import hashlib
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Column",
    "Raw",
    "data_table",
    "esc",
    "figure",
    "fmt",
    "kv_table",
    "page",
    "percent",
    "plain",
    "render_json",
    "table",
]

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde2ea; --bg: #f6f7f9; --accent: #2f6fb0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #1f2a3a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c7d0de; }
nav { background: #fff; border-bottom: 1px solid var(--line); padding: 8px 32px; position: sticky; top: 0;
      z-index: 2; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 600; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 22px 18px;
          margin: 18px 0; }
h2 { font-size: 19px; border-bottom: 2px solid var(--line); padding-bottom: 6px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; color: var(--muted); }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th .unit { font-weight: 400; color: var(--muted); }
caption { caption-side: top; text-align: left; color: var(--muted); font-size: 12px; padding: 2px 0 4px; }
.kv th { width: 220px; }
.kv td { overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: var(--muted); font-style: italic; }
.headline { font-size: 16px; margin: 10px 0; }
.headline b { font-size: 20px; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px;
         min-width: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; }
figure a.zoom { cursor: zoom-in; }
figure.small img { max-height: 300px; }
figure.medium { max-width: min(100%, 640px); }
figure.medium img { max-height: 460px; }
figure.large img { max-height: 760px; }
figure.wide { flex-basis: 100%; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; max-width: 560px; }
.lightbox { display: none; }
.lightbox:target { display: flex; position: fixed; inset: 0; z-index: 10; background: rgba(12, 16, 24, 0.9);
                   flex-direction: column; align-items: center; justify-content: center; gap: 8px; }
.lightbox a.close { position: absolute; inset: 0; cursor: zoom-out; }
.lightbox img { position: relative; max-width: 96vw; max-height: 88vh; background: #fff; pointer-events: none; }
.lightbox span { position: relative; color: #e8ecf2; font-size: 13px; pointer-events: none; }
img.patch { height: 56px; image-rendering: pixelated; border: 1px solid var(--line); vertical-align: middle; }
.member { display: inline-block; margin: 2px 10px 2px 0; white-space: nowrap; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #555; vertical-align: -2px;
          margin-right: 6px; border-radius: 3px; }
details > summary { cursor: pointer; font-weight: 600; margin: 10px 0; }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
a { color: var(--accent); }
"""


class Raw(str):
    """A string already in HTML (not escaped again)."""


def esc(x: Any) -> str:
    return x if isinstance(x, Raw) else html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """Compact text for a value: floats to ``digits`` significant digits, ``None``/NaN as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    return str(v)


def plain(v: Any, digits: int = 4, limit: int = 200) -> str:
    """Text for any value in a cell: scalars with :func:`fmt`, lists as ``a, b, c``, mappings as ``key: value; ...``
    (never JSON brackets), cut at ``limit`` characters."""
    if isinstance(v, Mapping):
        text = "; ".join(f"{k}: {plain(x, digits, limit)}" for k, x in v.items()) or "–"
    elif isinstance(v, (list, tuple)):
        text = ", ".join(plain(x, digits, limit) for x in v) or "–"
    else:
        text = fmt(v, digits)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def percent(v: Any, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage with ``digits`` decimals (``0.4213`` -> ``"42.13 %"``); None -> dash."""
    if v is None or not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return "–"
    return f"{100 * float(v):.{digits}f} %"


def _cell(v: Any) -> str:
    if isinstance(v, Raw):
        return f"<td>{v}</td>"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<td class="num">{esc(fmt(v))}</td>'
    return f"<td>{esc(plain(v))}</td>"


Format = Literal["text", "int", "float", "fraction%", "%", "html"]


@dataclass(frozen=True)
class Column:
    """A labelled table column: ``label`` and ``unit`` make the header (``label (unit)``); ``kind`` formats the cells.

    ``text``: any value as plain text; ``int``: whole numbers with thousands separators; ``float``: ``digits``
    significant digits; ``fraction%``: a fraction shown in percent with ``digits`` decimals (mIoU: 0.4213 -> 42.13);
    ``%``: a value already in percent, ``digits`` decimals; ``html``: the cell is trusted HTML (:class:`Raw`).
    ``note`` becomes the header's tooltip."""

    label: str
    unit: str = ""
    kind: Format = "text"
    digits: int = 4
    note: str = ""

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def cell(self, v: Any) -> str:
        """The ``<td>`` of value ``v`` in this column."""
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if self.kind == "html":
            return f"<td>{v if isinstance(v, Raw) else esc(plain(v))}</td>"
        if not numeric or math.isnan(float(v)):
            return f"<td>{esc(plain(v)) if v is not None and not numeric else '–'}</td>"
        if self.kind == "fraction%":
            text = f"{100 * float(v):.{self.digits}f}"
        elif self.kind == "%":
            text = f"{float(v):.{self.digits}f}"
        elif self.kind == "int":
            text = f"{int(round(v)):,}" if float(v).is_integer() else fmt(float(v), self.digits)
        else:
            text = fmt(v, self.digits)
        return f'<td class="num">{esc(text)}</td>'


def data_table(columns: Sequence[Column], rows: Iterable[Sequence[Any]], *, caption: str = "", cls: str = "") -> str:
    """A table of labelled columns (header ``label (unit)``, cells formatted by each :class:`Column`) inside a
    horizontally scrolling container, so a wide table never widens the page."""
    head = "".join(_header(c) for c in columns)
    body = []
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"a row of {len(r)} cells in a table of {len(columns)} columns: {list(r)!r:.120}")
        body.append("<tr>" + "".join(c.cell(v) for c, v in zip(columns, r)) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    opening = f'<table class="{esc(cls)}">' if cls else "<table>"
    return (
        f'<div class="scroll">{opening}{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _header(c: Column) -> str:
    title = f' title="{esc(c.note)}"' if c.note else ""
    unit = f' <span class="unit">({esc(c.unit)})</span>' if c.unit else ""
    return f"<th{title}>{esc(c.label)}{unit}</th>"


def table(headers: Sequence[Any] | None, rows: Iterable[Sequence[Any]], *, cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are :class:`Raw`, numbers right-aligned."""
    out = ['<div class="scroll">', f'<table class="{esc(cls)}">' if cls else "<table>"]
    if headers:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(_cell(v) for v in r) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


def kv_table(items: Mapping[str, Any]) -> str:
    """A two-column key/value table."""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, Raw) else esc(plain(v, limit=400))}</td></tr>"
        for k, v in items.items()
    )
    return f'<div class="scroll"><table class="kv">{rows}</table></div>'


def figure(src: str, caption: str | None = None, *, cls: str = "medium", alt: str | None = None) -> str:
    """An image (relative path) as a thumbnail with a caption; a click shows it enlarged over the page (CSS
    ``:target``, no script) and a click on the dark backdrop closes it again."""
    key = hashlib.sha1(f"{src}\0{caption}".encode()).hexdigest()[:10]
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    text = esc(alt or caption or src)
    return (
        f'<figure class="{esc(cls)}" id="f-{key}"><a class="zoom" href="#z-{key}" title="click to enlarge">'
        f'<img src="{esc(src)}" alt="{text}" loading="lazy"></a>{cap}</figure>'
        f'<div class="lightbox" id="z-{key}"><a class="close" href="#f-{key}" title="close"></a>'
        f'<img src="{esc(src)}" alt="{text}" loading="lazy"><span>{esc(caption or "")} · click to close</span></div>'
    )


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _cellish(v: Any) -> bool:
    """A value that fits in one table cell: a scalar or a short list of scalars."""
    return _is_scalar(v) or (isinstance(v, list) and len(v) <= 12 and all(_is_scalar(x) for x in v))


def _cell_value(v: Any) -> Any:
    return ", ".join(fmt(x) for x in v) if isinstance(v, list) else v


def _rows_table(named: Mapping[str, Mapping[str, Any]], max_rows: int, key_header: str = "") -> str:
    """``{row: {column: cell}}`` -> one table, a row per key (union of the columns)."""
    cols: list[str] = []
    for v in named.values():
        cols += [str(k) for k in v if str(k) not in cols]
    rows = [[str(k), *[_cell_value(v.get(c)) for c in cols]] for k, v in list(named.items())[:max_rows]]
    return table([key_header, *cols], rows)


def render_json(data: Any, *, depth: int = 0, max_rows: int = 200, max_depth: int = 4) -> str:
    """Generic rendering of a JSON value.

    A mapping -> a key/value table of its scalars (short scalar lists inline), one table for all its nested
    mappings that share the same keys (a column each, e.g. per-class values), and a sub-heading per other nested
    value; a mapping whose values are all flat mappings -> one table, a row per key. A list of mappings -> one table,
    a row each (union of keys as columns); a list of lists of scalars -> a matrix table; a list of scalars -> inline
    text. Long lists are cut at ``max_rows``.
    """
    if _is_scalar(data):
        return f"<p>{esc(fmt(data))}</p>"
    if depth > max_depth:
        return f"<p>{esc(plain(data, limit=400))}</p>"
    if isinstance(data, Mapping):

        def flat(v: Any) -> bool:
            return isinstance(v, Mapping) and bool(v) and all(_cellish(x) for x in v.values())

        if len(data) >= 2 and all(flat(v) for v in data.values()):  # {key: {column: scalar}}
            return _rows_table({str(k): v for k, v in data.items()}, max_rows)
        scalars = {str(k): _cell_value(v) for k, v in data.items() if _cellish(v)}
        nested = {str(k): v for k, v in data.items() if not _cellish(v)}
        out = [kv_table(scalars)] if scalars else []
        by_keys: dict[tuple[str, ...], list[str]] = {}
        for k, v in nested.items():
            if flat(v):
                by_keys.setdefault(tuple(str(x) for x in v), []).append(k)
        level = min(4 + depth, 6)
        done: set[str] = set()
        for keys, names in by_keys.items():
            if len(names) >= 2:  # parallel mappings over the same keys -> one table, a column per mapping
                columns = {key: {n: nested[n][key] for n in names} for key in keys}
                out.append(f"<h{level}>{esc(', '.join(names))}</h{level}>")
                out.append(_rows_table(columns, max_rows))
                done.update(names)
        for k, v in nested.items():
            if k in done:
                continue
            out.append(f"<h{level}>{esc(k)}</h{level}>")
            out.append(render_json(v, depth=depth + 1, max_rows=max_rows, max_depth=max_depth))
        return "".join(out)
    if isinstance(data, (list, tuple)):
        items = list(data)
        cut = len(items) > max_rows
        note = f'<p class="note">first {max_rows} of {len(items)} rows</p>' if cut else ""
        items = items[:max_rows]
        if not items:
            return '<p class="note">(empty)</p>'
        if all(isinstance(x, Mapping) for x in items):
            cols: list[str] = []
            for x in items:
                cols += [str(k) for k in x if str(k) not in cols]
            rows = [[_cell_value(x.get(c)) if _cellish(x.get(c)) else x.get(c) for c in cols] for x in items]
            return table(cols, rows) + note
        if all(isinstance(x, (list, tuple)) and all(_is_scalar(y) for y in x) for x in items):
            width = max(len(x) for x in items)
            matrix = [[i, *x, *[None] * (width - len(x))] for i, x in enumerate(items)]
            return table(["row", *[f"column {j}" for j in range(width)]], matrix) + note
        if all(_is_scalar(x) for x in items):
            return f"<p>{esc(', '.join(fmt(x) for x in items))}</p>" + note
        return "".join(render_json(x, depth=depth + 1, max_rows=max_rows, max_depth=max_depth) for x in items) + note
    return f"<p>{esc(str(data))}</p>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are (anchor id, heading, body HTML)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{b}</section>' for a, h, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
