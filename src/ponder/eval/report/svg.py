"""Small, dependency-free SVG charts for the bench report.

Inline SVG keeps the report one self-contained file (no network, no JavaScript, no plotting library needed to view
or build it), prints sharply, and lets every point carry a tooltip with its exact numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

# Okabe-Ito, a palette that colour-blind readers can tell apart; dense is always black.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99", "#999933",
           "#332288", "#AA4499", "#B8860B")  # Okabe-Ito without its pale yellow, then Tol's muted colours
FIXED = {"dense": "#000000", "dense-control": "#555555", "transformers-generate": "#7f7f7f", "random": "#8c8c8c"}
MARKERS = ("circle", "square", "triangle", "diamond", "down", "circle", "square", "triangle", "diamond", "down")


def colours(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per name: fixed ones for the references, the palette in sorted order for the rest."""
    out, k = {}, 0
    for n in sorted(set(names)):
        if n in FIXED:
            out[n] = FIXED[n]
        else:
            out[n] = PALETTE[k % len(PALETTE)]
            k += 1
    return out


def markers(names: Sequence[str]) -> dict[str, str]:
    rest = [n for n in sorted(set(names)) if n not in FIXED]
    out = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(rest)}
    out.update({n: ("star" if n == "dense" else "circle") for n in names if n in FIXED})
    return out


@dataclass
class Pt:
    x: float
    y: float
    tip: str = ""
    xerr: float | None = None  # half-width of a horizontal error bar
    label: str | None = None  # short text next to the point (e.g. the budget)


@dataclass
class Series:
    name: str
    points: list[Pt]
    colour: str = "#000000"
    marker: str = "circle"
    line: bool = True
    hollow: bool = False
    on_top: bool = False  # drawn after the others (a reference point must stay visible)


@dataclass
class Axis:
    label: str
    scale: str = "linear"  # "linear" | "log" | "ratio" (log of 1 + y: for relative changes that may be 0)
    lo: float | None = None
    hi: float | None = None
    fmt: Callable[[float], str] | None = None
    percent: bool = False  # "ratio" axes: label ticks as percentages

    def f(self, v: float) -> float:
        if self.scale == "log":
            return math.log10(max(v, 1e-12))
        if self.scale == "ratio":
            return math.log10(max(1.0 + v, 1e-6))
        return v


@dataclass
class Chart:
    title: str
    x: Axis
    y: Axis
    series: list[Series] = field(default_factory=list)
    vlines: list[tuple[float, str]] = field(default_factory=list)  # (x, label): dashed reference lines
    hlines: list[tuple[float, str]] = field(default_factory=list)
    diagonal: bool = False  # y = x reference
    frontier: list[tuple[float, float]] | None = None  # Pareto frontier, drawn as a light step line
    width: int = 600
    height: int = 400
    note: str = ""


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 12))
        v += step
    return out


def _ratio_ticks(lo: float, hi: float) -> list[float]:
    """Ticks (as relative changes) for a log(1 + y) axis whose transformed range is [lo, hi], roundest first
    (``_spread`` keeps them in this order while they do not crowd)."""
    pos = [0.0, 1, 10, 100, 1000, 0.5, 0.1, 5, 50, 500, 2, 0.2, 20, 200, 0.05, 0.01, 0.02]
    neg = [-0.5, -0.1, -0.9, -0.2, -0.05, -0.01, -0.02]
    return [c for c in pos + neg if lo - 1e-9 <= math.log10(1 + c) <= hi + 1e-9]


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                out.append(v)
    if len(out) > 8:
        out = [v for v in out if abs(math.log10(v) - round(math.log10(v))) < 1e-9] or out
    return out


def _spread(ticks: list[float], pos: Callable[[float], float], gap: float) -> list[float]:
    """Keep ticks in the given order (zero first) unless closer than ``gap`` pixels to one already kept."""
    kept: list[float] = []
    for t in sorted(ticks, key=lambda t: t != 0.0):
        if all(abs(pos(t) - pos(k)) >= gap for k in kept):
            kept.append(t)
    return sorted(kept)


def _fmt(v: float, axis: Axis) -> str:
    if axis.fmt is not None:
        return axis.fmt(v)
    if axis.scale == "ratio" and axis.percent:
        p = v * 100
        return f"{p:+.0f}%" if p != 0 else "0%"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.0e}"
    return f"{v:.3g}"


def _domain(vals: list[float], axis: Axis) -> tuple[float, float]:
    fv = [axis.f(v) for v in vals if v is not None and math.isfinite(v)]
    lo = axis.f(axis.lo) if axis.lo is not None else (min(fv) if fv else 0.0)
    hi = axis.f(axis.hi) if axis.hi is not None else (max(fv) if fv else 1.0)
    if hi - lo < 1e-9:
        pad = abs(hi) * 0.1 or 0.1
        lo, hi = lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return (lo if axis.lo is not None else lo - pad), (hi if axis.hi is not None else hi + pad)


def _marker(kind: str, cx: float, cy: float, r: float, fill: str, stroke: str) -> str:
    a = f'fill="{fill}" stroke="{stroke}" stroke-width="1.4"'
    if kind == "square":
        return f'<rect x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {a}/>'
    if kind in ("triangle", "down"):
        s = -1 if kind == "triangle" else 1
        pts = (f"{cx:.1f},{cy + s * r * 1.2:.1f} {cx - r * 1.1:.1f},{cy - s * r * 0.8:.1f} "
               f"{cx + r * 1.1:.1f},{cy - s * r * 0.8:.1f}")
        return f'<polygon points="{pts}" {a}/>'
    if kind == "diamond":
        pts = (f"{cx:.1f},{cy - r * 1.3:.1f} {cx + r * 1.1:.1f},{cy:.1f} "
               f"{cx:.1f},{cy + r * 1.3:.1f} {cx - r * 1.1:.1f},{cy:.1f}")
        return f'<polygon points="{pts}" {a}/>'
    if kind == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rr = r * 1.5 if k % 2 == 0 else r * 0.65
            pts.append(f"{cx + rr * math.cos(ang):.1f},{cy + rr * math.sin(ang):.1f}")
        return f'<polygon points="{" ".join(pts)}" {a}/>'
    return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" {a}/>'


def render(ch: Chart) -> str:
    """The chart as an inline ``<svg>`` element (fixed viewBox, scales with its container)."""
    names = {s.name for s in ch.series}
    legend_w = max(150, 36 + int(6.4 * max(map(len, names)))) if names else 0  # long variant names stay whole
    W, H = ch.width + max(0, legend_w - 150), ch.height  # the plot area keeps its size; the legend widens the chart
    ml, mr, mt, mb = 64, 16 + legend_w, 34, 52
    pw, ph = W - ml - mr, H - mt - mb
    xs = [p.x for s in ch.series for p in s.points] + [v for v, _ in ch.vlines]
    xs += ([p.x + (p.xerr or 0) for s in ch.series for p in s.points]
           + [p.x - (p.xerr or 0) for s in ch.series for p in s.points])
    ys = [p.y for s in ch.series for p in s.points] + [v for v, _ in ch.hlines]
    if ch.diagonal and xs and ys:
        both = [v for v in xs + ys if v is not None]
        xs, ys = both, both
    x0, x1 = _domain(xs, ch.x)
    y0, y1 = _domain(ys, ch.y)

    def X(v: float) -> float:
        return ml + (ch.x.f(v) - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return mt + ph - (ch.y.f(v) - y0) / (y1 - y0) * ph

    o: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
                    f'role="img" aria-label="{escape(ch.title)}" class="chart">']
    o.append(f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>')
    o.append(f'<text x="{ml}" y="20" class="ct">{escape(ch.title)}</text>')
    o.append(f'<clipPath id="c{id(ch)}"><rect x="{ml}" y="{mt}" width="{pw}" height="{ph}"/></clipPath>')
    # ticks and grid
    xt = (_ratio_ticks(x0, x1) if ch.x.scale == "ratio" else _log_ticks(x0, x1) if ch.x.scale == "log"
          else nice_ticks(x0, x1))
    yt = (_ratio_ticks(y0, y1) if ch.y.scale == "ratio" else _log_ticks(y0, y1) if ch.y.scale == "log"
          else nice_ticks(y0, y1))
    xt, yt = _spread(xt, X, 46), _spread(yt, Y, 17)
    for v in xt:
        px = X(v)
        if ml - 0.5 <= px <= ml + pw + 0.5:
            o.append(f'<line x1="{px:.1f}" y1="{mt}" x2="{px:.1f}" y2="{mt + ph}" class="grid"/>')
            o.append(f'<text x="{px:.1f}" y="{mt + ph + 16}" class="tk" text-anchor="middle">'
                     f'{escape(_fmt(v, ch.x))}</text>')
    for v in yt:
        py = Y(v)
        if mt - 0.5 <= py <= mt + ph + 0.5:
            o.append(f'<line x1="{ml}" y1="{py:.1f}" x2="{ml + pw}" y2="{py:.1f}" class="grid"/>')
            o.append(f'<text x="{ml - 6}" y="{py + 4:.1f}" class="tk" text-anchor="end">{escape(_fmt(v, ch.y))}</text>')
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333" stroke-width="1"/>')
    o.append(f'<text x="{ml + pw / 2:.1f}" y="{H - 12}" class="al" text-anchor="middle">{escape(ch.x.label)}</text>')
    o.append(f'<text transform="translate(16,{mt + ph / 2:.1f}) rotate(-90)" class="al" text-anchor="middle">'
             f'{escape(ch.y.label)}</text>')
    o.append(f'<g clip-path="url(#c{id(ch)})">')
    for v, lab in ch.vlines:
        px = X(v)
        o.append(f'<line x1="{px:.1f}" y1="{mt}" x2="{px:.1f}" y2="{mt + ph}" class="ref"/>')
        if lab:
            o.append(f'<text x="{px + 4:.1f}" y="{mt + 12}" class="rl">{escape(lab)}</text>')
    for v, lab in ch.hlines:
        py = Y(v)
        o.append(f'<line x1="{ml}" y1="{py:.1f}" x2="{ml + pw}" y2="{py:.1f}" class="ref"/>')
        if lab:
            o.append(f'<text x="{ml + pw - 4}" y="{py - 4:.1f}" class="rl" text-anchor="end">{escape(lab)}</text>')
    if ch.diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        if hi > lo:
            inv = (lambda t: t) if ch.x.scale == "linear" else (lambda t: 10 ** t)
            a, b = inv(lo), inv(hi)
            o.append(f'<line x1="{X(a):.1f}" y1="{Y(a):.1f}" x2="{X(b):.1f}" y2="{Y(b):.1f}" class="ref"/>')
            o.append(f'<text x="{X(b) - 4:.1f}" y="{Y(b) + 14:.1f}" class="rl" text-anchor="end">'
                     'measured = predicted</text>')
    if ch.frontier and len(ch.frontier) > 1:
        pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ch.frontier)
        o.append(f'<polyline points="{pts}" fill="none" stroke="#bbbbbb" stroke-width="7" stroke-linejoin="round" '
                 f'stroke-linecap="round" opacity="0.55"/>')
    for s in sorted(ch.series, key=lambda s: s.on_top):
        pts = [p for p in s.points if p.x is not None and p.y is not None]
        if s.line and len(pts) > 1:
            path = " ".join(f"{X(p.x):.1f},{Y(p.y):.1f}" for p in pts)
            o.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" stroke-width="1.6" opacity="0.9"/>')
        for p in pts:
            if p.xerr:
                a, b = X(p.x - p.xerr), X(p.x + p.xerr)
                py = Y(p.y)
                o.append(f'<path d="M{a:.1f},{py:.1f}H{b:.1f}M{a:.1f},{py - 3:.1f}v6M{b:.1f},{py - 3:.1f}v6" '
                         f'stroke="{s.colour}" stroke-width="1" fill="none"/>')
        for p in pts:
            fill = "#ffffff" if s.hollow else s.colour
            o.append(f'<g class="pt"><title>{escape(p.tip or s.name)}</title>'
                     + _marker(s.marker, X(p.x), Y(p.y), 4.2, fill, s.colour) + "</g>")
            if p.label:
                right = X(p.x) > ml + pw - 28
                o.append(f'<text x="{X(p.x) + (-6 if right else 6):.1f}" y="{Y(p.y) - 6:.1f}" class="pl" '
                         f'fill="{s.colour}" text-anchor="{"end" if right else "start"}">{escape(p.label)}</text>')
    o.append("</g>")
    # legend
    if ch.series:
        lx, ly = W - legend_w + 4, mt + 4
        seen = []
        for s in ch.series:
            if s.name in seen:
                continue
            seen.append(s.name)
            yy = ly + 18 * (len(seen) - 1)
            if s.line:
                o.append(f'<line x1="{lx}" y1="{yy + 5}" x2="{lx + 22}" y2="{yy + 5}" stroke="{s.colour}" '
                         'stroke-width="1.6"/>')
            o.append(_marker(s.marker, lx + 11, yy + 5, 4, "#ffffff" if s.hollow else s.colour, s.colour))
            o.append(f'<text x="{lx + 28}" y="{yy + 9}" class="lg">{escape(s.name)}</text>')
        if ch.frontier and len(ch.frontier) > 1:
            yy = ly + 18 * len(seen)
            o.append(f'<line x1="{lx}" y1="{yy + 5}" x2="{lx + 22}" y2="{yy + 5}" stroke="#bbbbbb" '
                     'stroke-width="7" opacity="0.55"/>')
            o.append(f'<text x="{lx + 28}" y="{yy + 9}" class="lg">Pareto frontier</text>')
    if ch.note:
        o.append(f'<text x="{ml + pw}" y="20" class="nt" text-anchor="end">{escape(ch.note)}</text>')
    o.append("</svg>")
    return "".join(o)


def pareto(points: list[tuple[float, float]], maximise_x: bool = True) -> list[tuple[float, float]]:
    """Non-dominated points: higher x (or lower, with ``maximise_x=False``) and lower y, sorted by x."""
    pts = sorted(set(points), key=lambda p: (-p[0] if maximise_x else p[0], p[1]))
    out, best = [], math.inf
    for x, y in pts:
        if y < best - 1e-12:
            out.append((x, y))
            best = y
    return sorted(out)


SVG_CSS = """
svg.chart{max-width:100%;height:auto;font-family:"Helvetica Neue",Helvetica,Arial,sans-serif}
svg.chart .ct{font-size:14px;font-weight:600;fill:#111}
svg.chart .tk{font-size:11px;fill:#444}
svg.chart .al{font-size:12px;fill:#222}
svg.chart .lg{font-size:11.5px;fill:#222}
svg.chart .pl{font-size:9.5px}
svg.chart .rl{font-size:10px;fill:#777}
svg.chart .nt{font-size:10px;fill:#777}
svg.chart .grid{stroke:#e6e6e6;stroke-width:1}
svg.chart .ref{stroke:#888;stroke-width:1;stroke-dasharray:4 3}
svg.chart g.pt:hover *{stroke-width:3}
"""
