"""Bench reports: a self-contained ``report.html`` (inline CSS and SVG, no network, no scripts) and ``report.md``.

``build.build_report(DIR)`` reads ``DIR/results.jsonl`` and renders every task found there (see :mod:`.build`).
Pieces for custom reports: ``svg`` (charts), ``page`` (tables, formatting, the page shell); ``lm`` is the
language-model report. The package itself imports nothing, so a task's report module (``ponder.encoders.report``)
can use ``page`` and ``svg`` while ``build`` imports that module in turn.
"""
