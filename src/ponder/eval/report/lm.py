"""The language-model bench report: verdicts, Pareto plots, every point, the flags, and a token-level view."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from ..sweep import NOISE_BAND
from . import svg
from .page import Column, Markup, env_html, env_md, fbytes, fnum, fpct, fx, html_page, table_html, table_md

CONTROL, PEER = "dense-control", "transformers-generate"
PEERS = (PEER, "llama.cpp-f32", "llama.cpp-file")  # other engines, timed beside ponder dense on the same inputs
SYSTEM = (CONTROL, *PEERS)
FLAGS = ("real", "kv_compatible", "batch_compatible", "training_free", "lossless")
DISPLAY_BUDGET = 0.75  # the token view shows each policy at the budget nearest this


# ---- selecting rows ----------------------------------------------------------------------------------------------

def select(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of the most recent settings (last one wins per point), and how many older-settings rows were left
    out."""
    lm = [r for r in rows if r.get("task", "lm") == "lm" and r.get("status") != "error"]
    if not lm:
        return [], 0
    skey = lm[-1].get("settings")
    keep: dict[tuple, dict[str, Any]] = {}
    for r in lm:
        if r.get("settings") == skey:
            keep[(r.get("policy"), round(float(r.get("budget", 1.0)), 6))] = r
    return list(keep.values()), sum(1 for r in lm if r.get("settings") != skey)


def _order(r: dict[str, Any]) -> tuple:
    p = r.get("policy")
    rank = 0 if p == "dense" else 2 if p == CONTROL else 3 + PEERS.index(p) if p in PEERS else 1
    return (rank, p, -float(r.get("budget", 1.0)))


def speed_ok(r: dict[str, Any]) -> bool:
    """Only policies that really skip work get a speedup shown."""
    return bool(r.get("real", False))


# ---- verdict lines -----------------------------------------------------------------------------------------------

def control_verdict(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(css class, text) for the A/A control."""
    c = next((r for r in rows if r.get("policy") == CONTROL), None)
    if c is None:
        return "warn", ("A/A control missing: no dense-against-dense timing in these results, so timing noise is "
                        "unknown.")
    parts = [f"{k.replace('_speedup', '').replace('_', ' ')} {c[k]:.3f}x" for k in sorted(c)
             if k.endswith("speedup") or (k.startswith("decode_speedup_b") and not k.endswith("range"))
             if isinstance(c.get(k), (int, float))]
    lo, hi = c.get("control_band", NOISE_BAND)
    if c.get("control_ok"):
        return "ok", (f"Dense timed against dense reads {', '.join(parts)}: within {lo}-{hi}, "
                      "so the machine was quiet enough for the speedups below.")
    return "bad", (f"Dense timed against dense reads {', '.join(parts)}: outside {lo}-{hi}. "
                   "The machine was too noisy during this bench; treat every speedup below as unreliable and rerun "
                   "on an idle machine.")


def peer_verdict(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    """One sentence per peer engine: its decode time beside ponder dense's, and whether greedy outputs agree."""
    lines, cls = [], "ok"
    for name in PEERS:
        p = next((r for r in rows if r.get("policy") == name), None)
        if p is None:
            continue
        if p.get("decode_ms_per_token") is None:
            notes = "; ".join(p.get("timing_notes", [])) or "not measured"
            lines.append(f"{name}: not run ({notes})")
            cls = "warn"
            continue
        s = p.get("decode_speedup")
        pd, hf = p.get("decode_ms_per_token_dense"), p.get("decode_ms_per_token")
        rel = (f"ponder dense is {1 / s:.2f}x faster" if s and s < 1 else
               f"{name} is {s:.2f}x faster than ponder dense" if s else "")
        same = p.get("greedy_exact_match")
        eq = ("identical" if same == 1.0 else f"identical on {same:.0%} of prompts (first divergence at token "
              f"{[d for d in p.get('greedy_first_divergence') or [] if d is not None][:4]})" if same is not None
              else "not compared")
        info = p.get("peer") or {}
        what = f"{info.get('library', 'transformers' if name == PEER else name)} {info.get('version', '')}".strip()
        on = f" on {info['weights']}" if info.get("weights") else ""
        lines.append(f"{name} ({what}{on}) decodes at {hf:.2f} ms/token, ponder dense at {pd:.2f} (batch 1, greedy): "
                     f"{rel}; greedy outputs {eq}")
        if same != 1.0 and name != "llama.cpp-file":  # a quantised file may legitimately differ
            cls = "warn"
    if not lines:
        return None
    return cls, ". ".join(lines) + "."


def best_points(rows: list[dict[str, Any]], tolerances=(0.01, 0.05, 0.25)) -> list[str]:
    """The fastest point within each perplexity tolerance. A point counts only when its speedup clears the A/A
    noise band (a 1.05x is indistinguishable from dense on a CPU) and it is not the dense plan in disguise
    (budget 1 of a lossy policy runs exactly the dense computation, so any speedup it shows is noise)."""
    out = []
    ctl = next((r for r in rows if r.get("policy") == CONTROL), {})
    floor = ctl.get("control_band", NOISE_BAND)[1]  # the band this run's control was judged by
    cand = [r for r in rows if r.get("policy") not in ("dense", *SYSTEM) and speed_ok(r)
            and not (r.get("budget", 0) >= 1.0 and not r.get("lossless"))
            and isinstance(r.get("decode_speedup"), (int, float)) and r["decode_speedup"] > floor
            and r.get("perplexity_delta") is not None]
    picks: list[tuple[list[float], dict[str, Any] | None]] = []  # tolerances that pick the same point share a line
    for tol in tolerances:
        ok = [r for r in cand if r["perplexity_delta"] <= tol]
        b = max(ok, key=lambda r: r["decode_speedup"]) if ok else None
        if picks and picks[-1][1] is b:
            picks[-1][0].append(tol)
        else:
            picks.append(([tol], b))
    for tols, b in picks:
        within = "within " + " and ".join(
            [", ".join(f"{t * 100:g}%" for t in tols[:-1]), f"{tols[-1] * 100:g}%"] if len(tols) > 1
            else [f"{tols[0] * 100:g}%"]) + " perplexity of dense"
        if b is not None:
            out.append(f"{within}, the fastest decode (batch 1) is "
                       f"<b>{escape(b['policy'])}</b> at budget {b['budget']:g}: {b['decode_speedup']:.2f}x, "
                       f"{fpct(b['perplexity_delta'])} perplexity, {b.get('flops_fraction', 0):.2f} of dense FLOPs")
        else:
            out.append(f"no point {within} decodes faster than dense by more than the {floor:g}x noise band")
    return out


# ---- plots -------------------------------------------------------------------------------------------------------

def _tip(r: dict[str, Any]) -> str:
    bits = [f"{r.get('policy')} @ budget {r.get('budget'):g}"]
    for k, f in (("flops_fraction", "FLOP fraction {:.3f}"), ("perplexity_delta", "perplexity {:+.2%}"),
                 ("kl", "KL {:.4f}"), ("top1_agreement", "top-1 agreement {:.3f}"),
                 ("decode_speedup", "decode speedup (b1) {:.2f}x"), ("prefill_speedup", "prefill speedup {:.2f}x")):
        v = r.get(k)
        if isinstance(v, (int, float)) and not (k.endswith("speedup") and not speed_ok(r)):
            bits.append(f.format(v))
    return "\n".join(bits)


def _series(rows: list[dict[str, Any]], xkey: str, ykey: str, cols: dict[str, str], marks: dict[str, str],
            need_speed: bool, xerr: str | None = None, label_budgets: bool = True) -> list[svg.Series]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("policy") in SYSTEM:
            continue
        if need_speed and not speed_ok(r):
            continue
        if not isinstance(r.get(xkey), (int, float)) or not isinstance(r.get(ykey), (int, float)):
            continue
        by.setdefault(r["policy"], []).append(r)
    out = []
    for name in sorted(by, key=lambda n: (n != "dense", n)):
        rs = sorted(by[name], key=lambda r: -float(r["budget"]))
        pts = [svg.Pt(r[xkey], r[ykey], _tip(r), xerr=(r.get(xerr) if xerr else None),
                      label=(f"{r['budget']:g}" if label_budgets and name != "dense" else None)) for r in rs]
        out.append(svg.Series(name, pts, cols.get(name, "#000"), marks.get(name, "circle"),
                              line=name != "dense", on_top=name == "dense"))
    return out


def _frontier(series: list[svg.Series], maximise_x: bool) -> list[tuple[float, float]]:
    pts = [(p.x, p.y) for s in series for p in s.points]
    return svg.pareto(pts, maximise_x=maximise_x) if len(pts) > 2 else []


def charts(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(svg, caption) pairs."""
    names = [r["policy"] for r in rows]
    cols, marks = svg.colours(names), svg.markers(names)
    qy = svg.Axis("perplexity increase over dense (log scale of ratio)", scale="ratio", percent=True)
    ctl = next((r for r in rows if r.get("policy") == CONTROL), None)
    noise = (f"A/A control {ctl['decode_speedup']:.2f}x" if ctl and isinstance(ctl.get("decode_speedup"), float)
             else "")
    out = []
    bs = next((int(k.split("_b")[1]) for r in rows for k in r if k.startswith("decode_speedup_b")
               and not k.endswith("range")), None)

    s = _series(rows, "decode_speedup", "perplexity_delta", cols, marks, True)
    ch = svg.Chart("Quality vs decode speed (batch 1)", svg.Axis("decode speedup over dense (x, measured)"), qy, s,
                   vlines=[(1.0, "dense")], frontier=_frontier(s, True), note=noise)
    out.append((svg.render(ch), "Perplexity increase against measured decode speedup at batch 1 (dense time / "
                "policy time, interleaved medians). Lower right is better; labels are budgets. Simulated "
                "policies are not plotted."))
    if bs:
        k = f"decode_speedup_b{bs}"
        s = _series(rows, k, "perplexity_delta", cols, marks, True)
        ch = svg.Chart(f"Quality vs decode speed (batch {bs})",
                       svg.Axis(f"decode speedup over dense at batch {bs} (x)"),
                       qy, s, vlines=[(1.0, "dense")], frontier=_frontier(s, True))
        out.append((svg.render(ch), f"The same at batch {bs}: per-token skipping must still pay when rows of a "
                    "batch disagree about which layers to run."))
    s = _series(rows, "flops_fraction", "perplexity_delta", cols, marks, False, xerr="flops_fraction_std")
    ch = svg.Chart("Quality vs compute", svg.Axis("executed fraction of dense layer FLOPs (counted)", lo=None), qy, s,
                   vlines=[(1.0, "")], frontier=_frontier(s, False))
    out.append((svg.render(ch), "Perplexity increase against the executed FLOP fraction counted by the engine on the "
                "evaluation text; bars show the standard deviation across sequences (a budget should be "
                "predictable, not just right on average). Lower left is better."))
    s = _series(rows, "flops_fraction", "top1_agreement", cols, marks, False)
    ch = svg.Chart("Agreement with dense vs compute", svg.Axis("executed fraction of dense layer FLOPs"),
                   svg.Axis("top-1 agreement with dense"), s, vlines=[(1.0, "")])
    out.append((svg.render(ch), "Share of positions where the policy's most likely next token equals dense's."))
    pr = [r for r in rows if r.get("probe_exact_match") is not None]
    if pr:
        s = _series(rows, "flops_fraction", "probe_exact_match", cols, marks, False)
        ch = svg.Chart("Probe exact match vs compute", svg.Axis("executed fraction of dense layer FLOPs"),
                       svg.Axis("probe exact match", lo=0), s, vlines=[(1.0, "")])
        out.append((svg.render(ch), "Exact-continuation probes (data/eval/probes.jsonl): names and facts that "
                    "perplexity can average away."))
    s = _series(rows, "predicted_decode_speedup", "decode_speedup", cols, marks, True, label_budgets=True)
    ch = svg.Chart("Realization: measured vs predicted decode speedup",
                   svg.Axis("predicted from weight bytes read (1 / fraction)"), svg.Axis("measured speedup"), s,
                   diagonal=True)
    out.append((svg.render(ch), "Points on the diagonal turn every skipped weight byte into time; below it, "
                "overheads (gathers, masks, per-layer fixed costs, host syncs) eat the saving."))
    return out


# ---- tables ------------------------------------------------------------------------------------------------------

def _swatch(cols: dict[str, str]):
    def get(r):
        c = cols.get(r["policy"], "#000")
        return Markup(f'<span class="swatch" style="background:{c}"></span>{escape(r["policy"])}')
    return get


def _spd(key: str, rng: str | None = None):
    def get(r):
        if r.get("policy") not in PEERS and not speed_ok(r):
            return "n/a (simulated)" if r.get("real") is False else ""
        if r.get("policy") == "dense":
            return "1 (ref)"
        return fx(r.get(key), r.get(rng) if rng else None)
    return get


def quality_cols(cols: dict[str, str], html: bool = True) -> list[Column]:
    return [
        Column("policy", _swatch(cols) if html else (lambda r: r["policy"]), align="left"),
        Column("budget", lambda r: f"{r['budget']:g}"),
        Column("FLOPs", lambda r: fnum(r.get("flops_fraction")),
               "executed fraction of dense layer FLOPs while scoring the perplexity windows (the model's context)"),
        Column("budget kept", lambda r: _pm(r.get("budget_realized"), r.get("flops_fraction_std")),
               "executed fraction on held-out text in windows as long as the calibration's (256 tokens), mean ± "
               "std across windows: the budget a calibrated policy promises"),
        Column("gen FLOPs", lambda r: _pm(r.get("gen_flops_fraction"), r.get("gen_flops_fraction_std")),
               "executed FLOP fraction during greedy generation (prefill + decode), mean ± std across prompts"),
        Column("weight bytes", lambda r: fnum(r.get("weight_bytes_fraction")),
               "fraction of dense layer weight bytes read during generation (batch 1)"),
        Column("ppl", lambda r: fnum(r.get("perplexity"), 4), "perplexity on the evaluation text"),
        Column("Δppl", lambda r: fpct(r.get("perplexity_delta")), "relative change of perplexity vs dense"),
        Column("Δppl prose", lambda r: fpct(r.get("prose_perplexity_delta")), "the same on English prose"),
        Column("KL", lambda r: fnum(r.get("kl")), "mean KL(dense || policy) per token, nats"),
        Column("top-1", lambda r: fnum(r.get("top1_agreement")), "top-1 agreement with dense"),
        Column("greedy EM", lambda r: fnum(r.get("greedy_exact_match")),
               "share of prompts whose greedy continuation equals dense's"),
        Column("1st div.", lambda r: fnum(r.get("first_divergence")),
               "mean index of the first generated token that differs from dense"),
        Column("probes", lambda r: fnum(r.get("probe_exact_match")), "probe exact match"),
    ]


def speed_cols(cols: dict[str, str], bs: int | None, html: bool = True) -> list[Column]:
    out = [
        Column("policy", _swatch(cols) if html else (lambda r: r["policy"]), align="left"),
        Column("budget", lambda r: f"{r['budget']:g}"),
        Column("decode b1", _spd("decode_speedup", "decode_speedup_range"),
               "decode speedup at batch 1: dense ms/token / policy ms/token, median of paired rounds (min-max)"),
    ]
    if bs:
        out.append(Column(f"decode b{bs}", _spd(f"decode_speedup_b{bs}", f"decode_speedup_b{bs}_range"),
                          f"decode speedup at batch {bs}"))
    out += [
        Column("prefill", _spd("prefill_speedup", "prefill_speedup_range"), "prefill speedup (1 x 128 tokens)"),
        Column("realization", lambda r: fnum(r.get("decode_realization")) if speed_ok(r) else "",
               "measured decode speedup / speedup predicted from weight bytes read"),
        Column("prefill real.", lambda r: fnum(r.get("prefill_realization")) if speed_ok(r) else "",
               "measured prefill speedup / speedup predicted from executed FLOPs"),
        Column("ms/token b1", lambda r: fnum(r.get("decode_ms_per_token")) if speed_ok(r) else ""),
    ]
    if bs:
        out.append(Column(f"tok/s b{bs}", lambda r: fnum(r.get(f"tokens_per_s_b{bs}")) if speed_ok(r) else ""))
    out += [
        Column("prefill ms", lambda r: fnum(r.get("prefill_ms")) if speed_ok(r) else ""),
        Column("peak mem", lambda r: fbytes(r.get("peak_memory_bytes"))),
        Column("KV cache", lambda r: fbytes(r.get("kv_cache_bytes")), "allocated KV cache of the batch decode"),
        Column("KV written", lambda r: fnum(r.get("kv_written_fraction")),
               "share of (token, layer) KV slots actually written"),
    ]
    return out


def headline_cols(bs: int | None) -> list[Column]:
    """The compact table for the terminal and the Markdown summary."""
    cols = [
        Column("policy", lambda r: r["policy"], align="left"),
        Column("budget", lambda r: f"{r['budget']:g}"),
        Column("FLOPs", lambda r: _pm(r.get("flops_fraction"), r.get("flops_fraction_std"))),
        Column("Δppl", lambda r: fpct(r.get("perplexity_delta"))),
        Column("KL", lambda r: fnum(r.get("kl"))),
        Column("top-1", lambda r: fnum(r.get("top1_agreement"))),
        Column("greedy EM", lambda r: fnum(r.get("greedy_exact_match"))),
        Column("probes", lambda r: fnum(r.get("probe_exact_match"))),
        Column("decode b1", _spd("decode_speedup")),
    ]
    if bs:
        cols.append(Column(f"decode b{bs}", _spd(f"decode_speedup_b{bs}")))
    cols += [Column("grounded b1",
                    lambda r: fx(r.get("decode_speedup_grounded"), r.get("decode_speedup_grounded_range"))
                    if r.get("decode_speedup_grounded") is not None else "",
                    "lossless rows: decode speedup at batch 1 on the input-grounded chat prompts"),
             Column("prefill", _spd("prefill_speedup")),
             Column("realization", lambda r: fnum(r.get("realization")) if speed_ok(r) else "")]
    return cols


def _pm(m: Any, s: Any) -> str:
    if m is None:
        return ""
    return f"{m:.3f} ± {s:.3f}" if isinstance(s, (int, float)) and s > 0 else f"{m:.3f}"


def flag_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=_order):
        if r.get("policy") in SYSTEM:
            continue
        seen.setdefault(r["policy"], r)
    return list(seen.values())


def flag_cols(cols: dict[str, str], html: bool = True) -> list[Column]:
    def mark(k):
        def get(r):
            v = r.get(k)
            if v is None:
                return ""
            if not html:
                return "yes" if v else "no"
            return Markup('<span class="yes">✓</span>' if v else '<span class="no">✗</span>')
        return get
    return ([Column("policy", _swatch(cols) if html else (lambda r: r["policy"]), align="left")]
            + [Column(k, mark(k), align="center") for k in FLAGS])


# ---- token view --------------------------------------------------------------------------------------------------

_CMAP = ((0.0, (255, 255, 217)), (0.25, (199, 233, 180)), (0.5, (127, 205, 187)), (0.75, (65, 182, 196)),
         (1.0, (34, 94, 168)))  # ColorBrewer YlGnBu: light = few layers, deep blue = every layer


def depth_colour(frac: float) -> tuple[str, str]:
    """(background, text) colour for a token that used ``frac`` of the layers (sequential, light = few)."""
    f = min(1.0, max(0.0, frac))
    for (a, ca), (b, cb) in zip(_CMAP, _CMAP[1:]):
        if f <= b:
            t = (f - a) / (b - a) if b > a else 0
            c = tuple(round(ca[i] + t * (cb[i] - ca[i])) for i in range(3))
            lum = 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
            return f"rgb({c[0]},{c[1]},{c[2]})", ("#ffffff" if lum < 120 else "#111111")
    return "rgb(34,94,168)", "#ffffff"


def token_view(sample: dict[str, Any]) -> str:
    pieces, layers = sample.get("pieces", []), sample.get("layers", [])
    L = sample.get("n_layers") or max(layers or [1])
    pl = sample.get("prompt_len", 0)
    out = ['<div class="tokens">']
    for i, piece in enumerate(pieces):
        vis = escape(piece).replace("\n", "↵\n")
        cls = ["pr"] if i < pl else []
        if i == pl:
            cls.append("gs")
        if i < len(layers):
            bg, fg = depth_colour(layers[i] / L)
            tip = f"{'prompt' if i < pl else 'generated'} token {i - pl if i >= pl else i}: {layers[i]}/{L} layers"
            out.append(f'<span class="{" ".join(cls)}" style="background:{bg};color:{fg}" title="{escape(tip)}">'
                       f"{vis}</span>")
        else:
            out.append(f'<span class="{" ".join(cls)}" title="never processed (last token)" '
                       f'style="outline:1px dashed #999">{vis}</span>')
    out.append("</div>")
    return "".join(out)


def colourbar(L: int) -> str:
    stops = ",".join(f"{depth_colour(k / 10)[0]} {k * 10}%" for k in range(11))
    return (f'<div class="cbar">layers used: <span>0</span><span class="bar" '
            f'style="background:linear-gradient(90deg,{stops})"></span><span>{L}</span></div>')


def pick_samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("sample") and r.get("policy") not in SYSTEM:
            by.setdefault(r["policy"], []).append(r)
    out = []
    for name in sorted(by, key=lambda n: (n != "dense", n)):
        rs = by[name]
        below = [r for r in rs if r["budget"] < 1] or rs
        out.append(min(below, key=lambda r: (abs(r["budget"] - DISPLAY_BUDGET), -r["budget"])))
    return out


SETTING_NAMES = {"data": "evaluation text", "prose": "prose text", "ppl_tokens": "perplexity tokens",
                 "prose_tokens": "prose tokens", "kl_tokens": "KL / top-1 tokens", "prompts": "greedy prompts",
                 "prompt_tokens": "prompt tokens", "new_tokens": "new tokens per prompt", "probes": "probes",
                 "prefill_tokens": "prefill tokens", "timing_tokens": "tokens per timed decode",
                 "calib_tokens": "calibration tokens", "decode_batch": "second decode batch",
                 "warmup": "warm-up rounds",
                 "repeats": "timed rounds (at least)", "min_timed_s": "seconds timed per side (at least)"}


def _settings_html(st: dict[str, Any]) -> str:
    if not st:
        return ""
    items = "".join(f"<dt>{escape(SETTING_NAMES.get(k, k))}</dt><dd>{escape(str(v))}</dd>" for k, v in st.items()
                    if v is not None and k != "probes_file")
    return f'<h3>Settings</h3><dl class="env">{items}</dl>'


# ---- the whole report --------------------------------------------------------------------------------------------

def by_quality(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dense first, then every point from the smallest perplexity increase to the largest: on a real model the
    training-free rows span +1% to +1e8%, and a reader looks for the usable ones at the top."""
    def key(r: dict[str, Any]) -> tuple:
        d = r.get("perplexity_delta")
        return (r.get("policy") != "dense", d if isinstance(d, (int, float)) and d == d else math.inf)
    return sorted(pts, key=key)


def build(all_rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(html, markdown) for the LM rows of a results file."""
    rows, older = select(all_rows)
    rows.sort(key=_order)
    if not rows:
        raise ValueError("no language-model rows")
    names = [r["policy"] for r in rows]
    cols = svg.colours(names)
    bs = next((int(k.split("_b")[1]) for r in rows for k in r if k.startswith("decode_speedup_b")
               and not k.endswith("range")), None)
    pts = [r for r in rows if r.get("policy") not in SYSTEM]
    env = next((r.get("env") for r in reversed(rows) if r.get("env")), {}) or {}
    model = rows[-1].get("model", "?")
    first = min((r.get("time", "") for r in rows), default="")
    last = max((r.get("time", "") for r in rows), default="")
    title = f"ponder bench: {model}"
    sub = (f"{len(pts)} points, {len({r['policy'] for r in pts})} policies, profile {rows[-1].get('profile', '?')}; "
           f"model {rows[-1].get('model_sha256', '?')}; {env.get('cpu', '?')}, {env.get('torch_threads', '?')} "
           f"threads, torch {env.get('torch', '?')}, {env.get('dtype', '?')} on {env.get('device', '?')}; {first[:16]} "
           f"to {last[:16]} UTC")
    cv_cls, cv = control_verdict(rows)
    verdicts = [f'<div class="verdict {cv_cls}"><b>A/A control.</b> {escape(cv)}</div>']
    pv = peer_verdict(rows)
    if pv:
        verdicts.append(f'<div class="verdict {pv[0]}"><b>Peer.</b> {escape(pv[1])}</div>')
    bp = best_points(rows)
    if bp:
        verdicts.append('<div class="verdict ok" style="background:#f4f7fb;border-color:#c9d6e8;color:#1f3550">'
                        "<b>At a glance.</b> " + "; ".join(bp) + ".</div>")
    if older:
        verdicts.append(f'<div class="verdict warn">{older} row(s) measured with other settings are in the results '
                        "file and left out of this report (a report compares one set of settings).</div>")
    skey = rows[-1].get("settings")
    errs = [r for r in all_rows if r.get("status") == "error" and r.get("settings") == skey]
    if errs:
        verdicts.append('<div class="verdict warn">Not measured: ' + "; ".join(
            f"{escape(r['policy'])} @ {r['budget']:g} ({escape(r.get('error', ''))})" for r in errs) + "</div>")
    sims = sorted({r["policy"] for r in pts if r.get("real") is False})
    if sims:
        verdicts.append(f'<div class="verdict warn">Simulated (real=false): {escape(", ".join(sims))}. '
                        "Their savings are not real computation skipped, so no speedup is shown for them.</div>")
    figs = "".join(f"<figure>{s}<figcaption>{escape(c)}</figcaption></figure>" for s, c in charts(rows))
    sections = [("Quality against speed and compute", f'<div class="figs">{figs}</div>')]
    rc = (lambda r: "ref" if r.get("policy") in ("dense", *SYSTEM) else "sim" if r.get("real") is False else "")
    sections.append(("Quality and compute (every point)",
                     '<div class="scroll">' + table_html(by_quality(pts), quality_cols(cols), row_class=rc) + "</div>"
                     + '<p class="small">Hover a column header for its definition. FLOPs are counted by the engine '
                       "where work happens (never inferred from a policy's intent).</p>"))
    sysrows = pts + [r for r in rows if r.get("policy") in SYSTEM]
    sections.append(("Speed and memory (every point)",
                     '<div class="scroll">' + table_html(sysrows, speed_cols(cols, bs), row_class=rc) + "</div>"
                     + '<p class="small">Speedups are dense time / policy time from the same process and weights, '
                       "timed in alternating rounds after warm-up; the median of the paired ratios is shown with "
                       "their min-max. The transformers row is relative to ponder dense.</p>"))
    sections.append(("Compatibility", table_html(flag_rows(rows), flag_cols(cols))
                     + '<p class="small"><b>real</b>: skipped work is really not computed. <b>kv_compatible</b>: '
                       "cached decoding equals recomputing the sequence. <b>batch_compatible</b>: a batch equals its "
                       "rows run alone. <b>training_free</b>: no trained weights needed. <b>lossless</b>: greedy "
                       "output identical to dense.</p>"))
    samples = pick_samples(rows)
    if samples:
        L = samples[0]["sample"].get("n_layers", 0)
        parts = [colourbar(L), '<p class="small">Each token is coloured by the layers it ran (attention or FFN) '
                 "when processed; faded text is the prompt, the bar marks where generation starts; hover for "
                 "numbers.</p>"]
        for r in samples:
            smp = r["sample"]
            gen = smp.get("layers", [])[smp.get("prompt_len", 0):]
            mean = (sum(gen) / len(gen)) if gen else float("nan")
            parts.append(f"<h3>{escape(r['policy'])} @ budget {r['budget']:g} "
                         f'<span class="small">(generated tokens used {mean:.1f} of {L} layers on average)</span></h3>'
                         + token_view(smp))
        sections.append(("Token-level view", "".join(parts)))
    sections.append(("Environment", env_html(env)))
    s0 = rows[-1]
    sections.append(("How this was measured", (
        "<ul>"
        "<li>Quality: perplexity with ponder's scorer (windows of the model context, stride half a window) on the "
        f"first {fnum(s0.get('ppl_tokens'))} tokens of the evaluation text; KL and top-1 on "
        f"{fnum(s0.get('kl_tokens'))} tokens in non-overlapping windows, against dense logits from the same weights; "
        "greedy exact match on prompts cut from held-out code; probe scoring as in data/eval/README.md.</li>"
        "<li>Compute: the engine's counters (executed FLOPs, weight bytes read, KV written), not the policy's "
        "claims; predicted speedups are 1 / total FLOP fraction (prefill) and 1 / total weight-byte fraction "
        "(decode), LM head included.</li>"
        "<li>Time: policy and dense in one process on the same weights, alternating rounds after discarded "
        "warm-up, medians with min/max; CUDA synchronised where used. The A/A control times dense against itself "
        "the same way.</li>"
        "<li>Results file: one JSON line per point (<code>results.jsonl</code>), each with its environment.</li>"
        "</ul>" + _settings_html(s0.get("bench_settings") or {}))))
    html = html_page(title, sub, sections, "".join(verdicts))

    md = [f"# {title}", "", sub, "", f"**A/A control.** {cv}", ""]
    if pv:
        md += [f"**Peer.** {pv[1]}", ""]
    if bp:
        md += ["**At a glance.** " + "; ".join(b.replace("<b>", "**").replace("</b>", "**") for b in bp) + ".", ""]
    if older:
        md += [f"{older} row(s) measured with other settings are in the results file and left out of this report.", ""]
    if errs:
        md += ["Not measured: " + "; ".join(f"{r['policy']} @ {r['budget']:g} ({r.get('error', '')})"
                                            for r in errs), ""]
    if sims:
        md += [f"Simulated (real=false, no speedup shown): {', '.join(sims)}.", ""]
    md += ["## Results", "", "Sorted by quality (perplexity change on held-out code, best first).", "",
           table_md(by_quality(pts) + [r for r in rows if r.get("policy") in PEERS], headline_cols(bs)), "",
           "Speedups: dense time / policy time (decode at batch 1 and batch "
           f"{bs or '-'}; prefill 1 x 128 tokens). realization = measured decode speedup / speedup predicted from "
           "weight bytes read.", "",
           "## Quality and compute", "", table_md(pts, [c for c in quality_cols(cols, html=False)]), "",
           "## Speed and memory", "", table_md(sysrows, speed_cols(cols, bs, html=False)), "",
           "## Compatibility", "", table_md(flag_rows(rows), flag_cols(cols, html=False)), "",
           "## Environment", "", env_md(env), "",
           "Plots and the token-level view: `report.html` in this folder.", ""]
    return html, "\n".join(md)


_ = math
