"""HTML page, tables (HTML and Markdown) and number formatting shared by every bench report.

A report is a title, a few lines of verdict, and sections of HTML; the same tables render as Markdown. Reusable
by any task's report (``Column`` + ``table_html`` / ``table_md`` + ``html_page``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from .svg import SVG_CSS


@dataclass
class Column:
    header: str
    get: Callable[[dict[str, Any]], Any]  # row -> display string (or None for an empty cell)
    title: str = ""  # tooltip / footnote explaining the column
    align: str = "right"


def fnum(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fpct(v: Any, signed: bool = True, digits: int = 1) -> str:
    if v is None:
        return ""
    p = 100 * v
    return f"{p:+.{digits}f}%" if signed else f"{p:.{digits}f}%"


def fx(v: Any, rng: Sequence[float] | None = None) -> str:
    """A speedup as 1.23x, with its min-max range when known."""
    if v is None:
        return ""
    s = f"{v:.2f}x"
    if rng:
        s += f" ({rng[0]:.2f}-{rng[1]:.2f})"
    return s


def fbytes(v: Any) -> str:
    if v is None:
        return ""
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= k:
            return f"{v / k:.1f} {unit}"
    return f"{int(v)} B"


def table_html(rows: list[dict[str, Any]], cols: list[Column], cls: str = "",
               row_class: Callable[[dict[str, Any]], str] | None = None) -> str:
    h = [f'<table class="{cls}"><thead><tr>']
    for c in cols:
        t = f' title="{escape(c.title)}"' if c.title else ""
        h.append(f'<th{t} style="text-align:{c.align}">{escape(c.header)}</th>')
    h.append("</tr></thead><tbody>")
    for r in rows:
        rc = row_class(r) if row_class else ""
        h.append(f'<tr class="{rc}">' if rc else "<tr>")
        for c in cols:
            v = c.get(r)
            h.append(f'<td style="text-align:{c.align}">'
                     f'{v if isinstance(v, Markup) else escape("" if v is None else str(v))}</td>')
        h.append("</tr>")
    h.append("</tbody></table>")
    return "".join(h)


class Markup(str):
    """A cell value that is already HTML (not escaped again)."""


def _md_cell(v: Any) -> str:
    s = "" if v is None else str(v)
    if isinstance(v, Markup):
        s = re.sub(r"<[^>]+>", "", s)
    return s.replace("|", "\\|").replace("\n", " ")


def table_md(rows: list[dict[str, Any]], cols: list[Column]) -> str:
    out = ["| " + " | ".join(c.header for c in cols) + " |",
           "|" + "|".join("---:" if c.align == "right" else ":---:" if c.align == "center" else "---"
                          for c in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_md_cell(c.get(r)) for c in cols) + " |")
    return "\n".join(out)


PAGE_CSS = """
:root{--fg:#1a1a1a;--muted:#666;--line:#ddd;--ok:#1b7f3b;--bad:#b3261e;--warn:#8a5a00}
*{box-sizing:border-box}
body{margin:0;background:#fafafa;color:var(--fg);font:14px/1.5 "Helvetica Neue",Helvetica,Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:28px 32px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px;font-weight:650;letter-spacing:-.01em}
h2{font-size:17px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line);font-weight:600}
h3{font-size:14px;margin:18px 0 6px}
p.sub{color:var(--muted);margin:0 0 16px}
.verdict{padding:10px 14px;border-radius:6px;margin:10px 0;border:1px solid}
.verdict.ok{background:#eef7f0;border-color:#b9dcc3;color:#114d24}
.verdict.bad{background:#fbeeee;border-color:#eab8b4;color:#7a1a14}
.verdict.warn{background:#fdf6e7;border-color:#ecd49b;color:#5c3d00}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px 22px}
figure{margin:0}
figcaption{font-size:12.5px;color:var(--muted);margin-top:4px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{padding:4px 9px;border-bottom:1px solid #eee;white-space:nowrap}
thead th{border-bottom:1.5px solid #333;font-weight:600;background:#fff;position:sticky;top:0}
tbody tr:hover{background:#f5f8fc}
tr.ref td{background:#f6f6f6}
tr.sim td{color:#888}
.scroll{overflow-x:auto}
.yes{color:var(--ok);font-weight:600}.no{color:var(--bad)}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.tokens{font:12.5px/1.9 "SFMono-Regular",Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;
  border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:#fff}
.tokens span{border-radius:2px;padding:1px 0}
.tokens span.pr{opacity:.55}
.tokens span.gs{border-left:2px solid #111;margin-left:1px}
.cbar{display:flex;align-items:center;gap:8px;font-size:12px;color:var(--muted);margin:6px 0}
.cbar .bar{height:12px;width:260px;border-radius:2px;border:1px solid #ccc}
dl.env{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;font-size:12.5px}
dl.env dt{color:var(--muted)}dl.env dd{margin:0;font-family:Menlo,Consolas,monospace}
.small{font-size:12px;color:var(--muted)}
code{font-family:Menlo,Consolas,monospace;font-size:12px;background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def html_page(title: str, subtitle: str, sections: list[tuple[str, str]], verdicts: str = "") -> str:
    """A complete self-contained HTML document (inline CSS, inline SVG, no scripts, no external resources)."""
    body = [f"<h1>{escape(title)}</h1>", f'<p class="sub">{escape(subtitle)}</p>', verdicts]
    for head, html in sections:
        body.append(f"<section><h2>{escape(head)}</h2>{html}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{PAGE_CSS}{SVG_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def env_html(env: dict[str, Any]) -> str:
    items = []
    for k, v in env.items():
        if v is None or v == [] or v == {}:
            continue
        items.append(f"<dt>{escape(str(k))}</dt><dd>{escape(v if isinstance(v, str) else str(v))}</dd>")
    return f'<dl class="env">{"".join(items)}</dl>'


def env_md(env: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: `{v}`" for k, v in env.items() if v not in (None, [], {}))


def md_headline(md: str) -> str:
    """The verdict line and the main table of report.md, for the terminal."""
    lines = md.splitlines()
    out, on = [], False
    for ln in lines:
        if ln.startswith("## Results"):
            on = True
            continue
        if on and ln.startswith("## "):
            break
        if on:
            out.append(ln)
    verdict = [ln for ln in lines if ln.startswith("**A/A control")]
    return "\n".join(verdict + [""] + [ln for ln in out if ln.strip() or out]).strip()
