"""Write a bench folder's report: every task in ``results.jsonl``, each rendered by its builder.

``build_report(DIR)`` reads ``DIR/results.jsonl`` and renders every task found there: the language-model report
(``lm``) is built in; another task has a builder in ``BUILDERS``, a function taking the task's rows and returning
``(title, sections_html, markdown)``; tasks without a builder get a generic table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...encoders.report import build_sections as embed_sections
from ...errors import PonderError
from ..sweep import RESULTS, read_rows
from . import lm, page, svg

Builder = Callable[[list[dict[str, Any]]], tuple[str, list[tuple[str, str]], str]]
BUILDERS: dict[str, Builder] = {"embed": embed_sections}


def _generic(task: str, rows: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]], str]:
    """Every scalar field of every row, for tasks without a dedicated report."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and (v is None or isinstance(v, (int, float, str, bool))) and k not in ("env", "time"):
                keys.append(k)
    cols = [page.Column(k, (lambda r, k=k: page.fnum(r.get(k)) if isinstance(r.get(k), (int, float))
                             else r.get(k)), align="left" if k in ("policy", "task", "model") else "right")
            for k in keys]
    html = '<div class="scroll">' + page.table_html(rows, cols) + "</div>"
    return f"task {task}", [(f"{task}: every point", html)], f"## {task}\n\n" + page.table_md(rows, cols) + "\n"


def render_rows(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(html, markdown) for the rows of a results file (all tasks in it)."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        tasks.setdefault(r.get("task", "lm"), []).append(r)
    if set(tasks) == {"lm"}:
        return lm.build(rows)
    sections: list[tuple[str, str]] = []
    mds: list[str] = []
    title = "ponder bench"
    for task, trs in tasks.items():
        if task == "lm":
            h, m = lm.build(trs)
            body = h.split("<main>", 1)[1].rsplit("</main>", 1)[0]
            sections.append(("Language model", body))
            mds.append(m)
            continue
        fn = BUILDERS.get(task)
        t, secs, md = (fn or (lambda rs, task=task: _generic(task, rs)))(trs)
        if len(tasks) == 1:
            title = t
        sections += secs
        mds.append(md)
    env = next((r.get("env") for r in reversed(rows) if r.get("env")), None)
    if env:
        sections.append(("Environment", page.env_html(env)))
    html = page.html_page(title, f"{len(rows)} result rows", sections)
    return html, "\n\n".join(mds)


def build_report(out_dir: str | Path) -> list[Path]:
    """Write ``report.html`` and ``report.md`` next to ``results.jsonl``; returns their paths."""
    d = Path(out_dir)
    rows = read_rows(d / RESULTS)
    if not rows:
        raise PonderError(f"{d / RESULTS} holds no results to report")
    html, md = render_rows(rows)
    h, m = d / "report.html", d / "report.md"
    paths = [h, m]
    main = main_plot(html)
    if main:  # the first chart on its own, so report.md shows it where Markdown is rendered (GitHub, notes)
        sv = d / "main-plot.svg"
        _write(sv, main)
        paths.insert(1, sv)
        head, sep, rest = md.partition("\n\n")
        md = f"{head}{sep}![main plot: quality loss against measured speedup](main-plot.svg)\n\n{rest}"
    _write(h, html)
    _write(m, md)
    return paths


def main_plot(html: str) -> str | None:
    """The report's first chart as a standalone SVG document (None when the report has no chart)."""
    i = html.find("<svg")
    j = html.find("</svg>", i)
    if i < 0 or j < 0:
        return None
    el = html[i:j + len("</svg>")]
    k = el.index(">") + 1  # the page's chart style goes inside, so the file looks the same on its own
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{el[:k]}<style>{svg.SVG_CSS}</style>{el[k:]}\n'


def _write(p: Path, text: str) -> None:
    """Replace atomically, so a viewer never sees half a report (the report is derived; results never are)."""
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)

