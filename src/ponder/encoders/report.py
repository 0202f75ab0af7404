"""The embed section of the bench report (``ponder.eval.report.build.BUILDERS["embed"]``).

``build_sections(rows)`` returns (title, [(heading, html)], markdown): verdicts (A/A control, the issue's target),
the table of every point, the frontier of every policy (quality against measured speedup and against FLOPs), and
the pruning-versus-merging comparison, worded from the numbers in the rows.
"""

from __future__ import annotations

from html import escape
from typing import Any

from ..eval.report import page, svg
from ..eval.report.page import md_headline

CONTROL = "dense-control"
TARGET = {"speedup_b32": 1.8, "cos_mean": 0.99, "recall_drop_points": 1.0}  # the embedding issue's target


def _f(v: Any, d: int = 4) -> str:
    return "" if v is None else f"{v:.{d}f}"


def _speed(r: dict[str, Any], tag: str) -> str:
    return page.fx(r.get(f"speedup_{tag}"), r.get(f"speedup_{tag}_range"))


def _tps(r: dict[str, Any], tag: str) -> str:
    v = r.get(f"texts_per_s_{tag}")
    rng = r.get(f"texts_per_s_{tag}_range")
    if v is None:
        return ""
    return f"{v:.1f}" + (f" ({rng[0]:.1f}-{rng[1]:.1f})" if rng else "")


def _knob(r: dict[str, Any]) -> str:
    c = r.get("calibration") or {}
    return ", ".join(f"{k}={v}" for k, v in c.items())


COLUMNS = [
    page.Column("policy", lambda r: r["policy"], align="left"),
    page.Column("budget", lambda r: f"{r['budget']:g}"),
    page.Column("FLOPs", lambda r: _f(r.get("flops_fraction"), 3), "executed / dense FLOPs over the passages"),
    page.Column("FLOPs w/ padding", lambda r: _f(r.get("padded_flops_fraction"), 3),
                "rows of the matrices actually multiplied, padding included"),
    page.Column("cos mean", lambda r: _f(r.get("cos_mean")), "passage embedding cosine to dense"),
    page.Column("cos p1", lambda r: _f(r.get("cos_p1")), "1st percentile of the passage cosines"),
    page.Column("query cos", lambda r: _f(r.get("query_cos_mean"))),
    page.Column("recall@10", lambda r: "" if r.get("recall_at_10") is None else
                f"{100 * r['recall_at_10']:.1f} ({-r.get('recall_drop_points', 0):+.1f})",
                "gold passage in the top 10 (points vs dense)"),
    page.Column("overlap@10", lambda r: _f(r.get("overlap_at_10"), 3), "share of the dense top 10 kept"),
    page.Column("texts/s b32", lambda r: _tps(r, "b32"), "median (min-max over rounds)"),
    page.Column("speedup b32", lambda r: _speed(r, "b32"), "paired per-round dense/policy time: median (min-max)"),
    page.Column("texts/s b1", lambda r: _tps(r, "b1")),
    page.Column("speedup b1", lambda r: _speed(r, "b1")),
    page.Column("fitted knob", _knob, align="left"),
]


def _meets(r: dict[str, Any]) -> bool:
    return (r.get("cos_mean") or 0) >= TARGET["cos_mean"] and (r.get("recall_drop_points") or 0) <= \
        TARGET["recall_drop_points"] + 1e-9


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(css class, text) lines: A/A control, then the target."""
    out: list[tuple[str, str]] = []
    ctl = next((r for r in reversed(rows) if r["policy"] == CONTROL), None)
    if ctl:
        s32, s1 = ctl.get("speedup_b32"), ctl.get("speedup_b1")
        ok = ctl.get("control_ok")
        out.append(("ok" if ok else "bad",
                    f"A/A control (dense timed against dense): {page.fx(s32, ctl.get('speedup_b32_range'))} at batch "
                    f"32, {page.fx(s1, ctl.get('speedup_b1_range'))} at batch 1 - "
                    + ("within the noise band; speedups below are trustworthy to about that spread." if ok else
                       "OUTSIDE the 0.9-1.1 band: the machine was too noisy; treat the speedups below with care.")))
    pts = [r for r in rows if r["policy"] not in ("dense", CONTROL) and r.get("speedup_b32") is not None]
    good = [r for r in pts if _meets(r)]
    want = TARGET["speedup_b32"]
    if good:
        best = max(good, key=lambda r: r["speedup_b32"])
        hit = best["speedup_b32"] >= want
        out.append(("ok" if hit else "warn",
                    f"Target (>= {want}x at batch 32 with cos >= {TARGET['cos_mean']} and recall@10 within "
                    f"{TARGET['recall_drop_points']:g} point of dense): {'MET' if hit else 'NOT MET'} - best "
                    f"qualifying point {best['policy']} @ {best['budget']:g}: {_speed(best, 'b32')} at batch 32, "
                    f"cos {best['cos_mean']:.4f}, recall@10 {-best['recall_drop_points']:+.1f} points."))
    elif pts:
        out.append(("bad", f"Target NOT MET: no policy point keeps cos >= {TARGET['cos_mean']} and recall@10 within "
                           f"{TARGET['recall_drop_points']:g} point of dense."))
    if pts:
        fastest = max(pts, key=lambda r: r["speedup_b32"])
        out.append(("warn" if not _meets(fastest) else "ok",
                    f"Fastest point: {fastest['policy']} @ {fastest['budget']:g}: {_speed(fastest, 'b32')} at batch "
                    f"32, cos {fastest.get('cos_mean', 0):.4f}, recall@10 {-fastest.get('recall_drop_points', 0):+.1f}"
                    " points."))
    return out


def prune_vs_merge(rows: list[dict[str, Any]]) -> str:
    """Where pruning beats merging (and the reverse), at equal budget, from the rows themselves."""
    def best_at(prefix: str) -> dict[float, dict[str, Any]]:
        out: dict[float, dict[str, Any]] = {}
        for r in rows:
            if r.get("policy_name", r["policy"].split(":")[0]) == prefix and r.get("cos_mean") is not None:
                b = r["budget"]
                if b not in out or r["cos_mean"] > out[b]["cos_mean"]:
                    out[b] = r
        return out

    pr, mg = best_at("token-prune"), best_at("token-merge")
    common = sorted(set(pr) & set(mg) - {1.0}, reverse=True)
    if not common:
        return "Pruning and merging were not both measured at a common budget below 1."
    lines = []
    p_wins = [b for b in common if pr[b]["cos_mean"] > mg[b]["cos_mean"]]
    m_wins = [b for b in common if b not in p_wins]
    for b in common:
        p, m = pr[b], mg[b]
        lines.append(f"budget {b:g}: prune ({p['policy']}) cos {p['cos_mean']:.4f}, recall "
                     f"{-p['recall_drop_points']:+.1f}"
                     f", {_speed(p, 'b32')}; merge ({m['policy']}) cos {m['cos_mean']:.4f}, recall "
                     f"{-m['recall_drop_points']:+.1f}, {_speed(m, 'b32')}")
    if not p_wins:
        verdict = ("Merging beats pruning at every measured budget: a merged token still carries its originals "
                   "(a size-weighted mean of them, kept for pooling through virtual unmerging), while a pruned "
                   "token's contribution to a mean-pooled embedding is either lost or frozen at a layer whose "
                   "states live in another space. Mean pooling rewards keeping every token's information.")
    elif not m_wins:
        verdict = ("Pruning beats merging at every measured budget: it decides once and cheaply (scores from the "
                   "attention it already computes), while merging pays a similarity matrix per layer and mixes "
                   "tokens that later layers would have told apart.")
    else:
        verdict = (f"Pruning beats merging at budget(s) {', '.join(f'{b:g}' for b in p_wins)} and merging wins at "
                   f"{', '.join(f'{b:g}' for b in m_wins)}: pruning's decisions are cheap and its kept tokens exact, "
                   "which pays when only a few tokens go; merging keeps every token's information in the pool, "
                   "which pays when many must go.")
    fast = [b for b in common if (pr[b].get("speedup_b32") or 0) > (mg[b].get("speedup_b32") or 0)]
    if fast:
        verdict += (f" On speed the order flips: at budget(s) {', '.join(f'{b:g}' for b in fast)} pruning runs faster "
                    "than merging at batch 32 for the same FLOPs fraction, because a pruning decision is a "
                    "top-k over scores the layer already has, while merging pays a similarity matrix, a matching and "
                    "weighted scatters in every merging layer.")
    return verdict + "\n\n" + "\n".join(f"- {ln}" for ln in lines)


def charts(rows: list[dict[str, Any]]) -> list[str]:
    pts = [r for r in rows if r["policy"] not in (CONTROL,) and r.get("cos_mean") is not None]
    names = sorted({r["policy"] for r in pts})
    col, mk = svg.colours(names), svg.markers(names)
    out = []
    for title, xk, xl, yk, yl in (
            ("Quality vs measured speed (batch 32)", "speedup_b32", "speedup vs dense, batch 32", "cos_mean",
             "mean cosine to dense"),
            ("Retrieval vs measured speed (batch 32)", "speedup_b32", "speedup vs dense, batch 32", "recall_at_10",
             "recall@10"),
            ("Quality vs FLOPs", "flops_fraction", "FLOPs fraction of dense", "cos_mean", "mean cosine to dense"),
            ("Does saved compute become time? (batch 32)", "flops_fraction", "FLOPs fraction of dense",
             "speedup_b32", "speedup vs dense, batch 32")):
        series = []
        for n in names:
            ps = sorted((r for r in pts if r["policy"] == n and r.get(xk) is not None and r.get(yk) is not None),
                        key=lambda r: r[xk])
            if not ps:
                continue
            series.append(svg.Series(n, [svg.Pt(r[xk], r[yk], f"{n} @ {r['budget']:g}: {xl} {r[xk]:.3f}, "
                                                              f"{yl} {r[yk]:.4f}", label=f"{r['budget']:g}")
                                         for r in ps], col[n], mk[n]))
        ch = svg.Chart(title, svg.Axis(xl), svg.Axis(yl), series)
        if yk == "cos_mean":
            ch.hlines.append((TARGET["cos_mean"], f"cos {TARGET['cos_mean']}"))
        if xk == "speedup_b32":
            ch.vlines.append((TARGET["speedup_b32"], f"{TARGET['speedup_b32']}x target"))
        out.append(f"<figure>{svg.render(ch)}</figure>")
    return out


def build_sections(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]], str]:
    # the newest row per (policy, budget, settings) wins
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        seen[(r["policy"], r["budget"], r.get("settings"))] = r
    errs = [r for r in seen.values() if r.get("status") == "error"]
    rows = [r for r in seen.values() if r.get("status") != "error"]
    model = rows[0].get("model", "?") if rows else "?"
    order = {"dense": 0, CONTROL: 1}
    table_rows = sorted((r for r in rows if r["policy"] != CONTROL),
                        key=lambda r: (order.get(r["policy"], 2), r["policy"], -r["budget"]))
    ver = verdicts(rows)
    if errs:
        ver.append(("warn", "Not measured: " + "; ".join(f"{r['policy']} @ {r['budget']:g} ({r.get('error', '')})"
                                                         for r in errs)))
    vhtml = "".join(f'<div class="verdict {c}">{escape(t)}</div>' for c, t in ver)
    dense = next((r for r in rows if r["policy"] == "dense"), {})
    info = (f"<p class=\"small\">{dense.get('passages', '?')} passages (mean {dense.get('mean_passage_tokens', 0):.0f} "
            f"tokens) and {dense.get('queries', '?')} queries from data/retrieval; dense recall@10 "
            f"{100 * (dense.get('recall_at_10') or 0):.1f}. Throughput is the encoder from token ids (tokenisation, "
            "identical for every policy, is left out); every policy is timed interleaved with dense in the same "
            "process. Budgets are fractions of dense FLOPs; each policy's knob is fitted on the calibration "
            "split.</p>")
    table = ('<div class="scroll">'
             + page.table_html(table_rows, COLUMNS, row_class=lambda r: "ref" if r["policy"] == "dense" else "")
             + "</div>")
    pvm = prune_vs_merge(rows)
    pvm_html = "".join(f"<p>{escape(p)}</p>" if not p.startswith("- ") else
                       "<ul>" + "".join(f"<li>{escape(ln[2:])}</li>" for ln in p.splitlines()) + "</ul>"
                       for p in pvm.split("\n\n"))
    sections = [("Embeddings: verdict", vhtml + info), ("Embeddings: every point", table),
                ("Embeddings: frontiers", '<div class="figs">' + "".join(charts(rows)) + "</div>"),
                ("Embeddings: pruning vs merging", pvm_html)]
    stage_rows = dense.get("stage_cos") or []
    stage_md = ""
    if stage_rows:
        cols = [page.Column("state", lambda r: r["stage"], align="left"),
                page.Column("pooled as is", lambda r: _f(r["raw_cos"]), "cosine to the real embedding"),
                page.Column("through the affine map", lambda r: _f(r["mapped_cos"]),
                            "the map a frozen token goes through (fitted on the calibration split)")]
        note = ("How far the remaining layers still move the embedding: the mean-pooled embedding of each "
                "intermediate state, compared with the real one (dense). A token that leaves at a stage is "
                "represented by a state like these; a merged token, by contrast, still reaches the last layer.")
        sections.append(("Embeddings: why tokens cannot leave early",
                         f"<p>{escape(note)}</p>" + page.table_html(stage_rows, cols)))
        stage_md = "\n## Why tokens cannot leave early\n\n" + note + "\n\n" + page.table_md(stage_rows, cols) + "\n"
    md = [f"# ponder bench: embeddings ({model})", ""]
    md += [f"**{t.split(':', 1)[0]}**:{t.split(':', 1)[1]}" if ":" in t else t for _, t in ver]
    md += ["", "## Results", "", page.table_md(table_rows, COLUMNS), "", "## Pruning vs merging", "", pvm, stage_md]
    return f"ponder bench: embeddings ({model})", sections, "\n".join(md)


def headline(md: str) -> str:
    """The verdict lines and the results table of report.md, for the terminal."""
    extra = [ln for ln in md.splitlines() if ln.startswith("**") and not ln.startswith("**A/A control")]
    head = md_headline(md).splitlines()
    return "\n".join(head[:1] + extra + head[1:])
