"""The bench report: content rules on synthetic rows, and a render in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ponder.eval.report import svg
from ponder.eval.report.build import build_report, render_rows
from ponder.eval.report.lm import depth_colour

ENV = {"cpu": "Test CPU", "torch_threads": 2, "torch": "2.x", "dtype": "float32", "device": "cpu",
       "attention": "sdpa", "ponder": "0.1.0"}


def _row(policy, budget, **kw):
    r = {"task": "lm", "policy": policy, "budget": budget, "settings": "s", "profile": "quick", "model": "tiny",
         "model_sha256": "abc", "real": True, "kv_compatible": True, "batch_compatible": True, "training_free": True,
         "lossless": policy == "dense", "env": ENV, "time": "2026-01-01T00:00:00+00:00"}
    r.update(kw)
    return r


def rows(control=1.01, sim_speed=9.87):
    out = [_row("dense", 1.0, perplexity=10.0, perplexity_delta=0.0, kl=0.0, top1_agreement=1.0, flops_fraction=1.0,
                flops_fraction_std=0.0, decode_speedup=1.0, decode_speedup_b8=1.0, prefill_speedup=1.0,
                decode_ms_per_token=3.0, predicted_decode_speedup=1.0, greedy_exact_match=1.0, probe_exact_match=0.4,
                sample={"prompt_len": 3, "pieces": ["def", " f", "(x", "):", "\n", "  return"],
                        "layers": [12, 12, 12, 12, 12], "n_layers": 12}),
           _row("dense-control", 1.0, decode_speedup=control, decode_speedup_b8=1.0, prefill_speedup=0.99,
                control_ok=0.9 <= control <= 1.1, control_band=[0.9, 1.1]),
           _row("transformers-generate", 1.0, decode_speedup=0.5, decode_ms_per_token=6.0,
                decode_ms_per_token_dense=3.0, greedy_exact_match=1.0, peer={"version": "5.0"})]
    for i, b in enumerate((0.9, 0.75, 0.5)):
        out.append(_row("random", b, perplexity=10 * (1 + 0.4 * (1 - b) * 4), perplexity_delta=0.4 * (1 - b) * 4,
                        kl=0.3 * (1 - b), top1_agreement=1 - (1 - b), flops_fraction=b, flops_fraction_std=0.02,
                        decode_speedup=1 + (1 - b) * 0.5, decode_speedup_b8=1 + (1 - b) * 0.3,
                        prefill_speedup=1 + (1 - b) * 0.6, predicted_decode_speedup=1 / b,
                        decode_realization=(1 + (1 - b) * 0.5) * b, realization=(1 + (1 - b) * 0.5) * b,
                        probe_exact_match=0.4 - 0.1 * i,
                        sample={"prompt_len": 3, "pieces": ["def", " f", "(x", "):", "\n", "  return"],
                                "layers": [12, 9, 7, 5, 2], "n_layers": 12}))
        out.append(_row("layer-drop", b, perplexity_delta=0.05 * (1 - b) * 10, kl=0.1 * (1 - b),
                        top1_agreement=1 - 0.5 * (1 - b), flops_fraction=b - 0.02, decode_speedup=1 / b * 0.95,
                        decode_speedup_b8=1 / b * 0.9, prefill_speedup=1 / b * 0.9, predicted_decode_speedup=1 / b,
                        realization=0.95, probe_exact_match=0.35))
    out.append(_row("fake-sim", 0.5, real=False, perplexity_delta=0.01, kl=0.01, top1_agreement=0.99,
                    flops_fraction=0.5, decode_speedup=sim_speed, prefill_speedup=sim_speed))
    return out


def test_report_content_rules():
    html, md = render_rows(rows())
    assert "9.87" not in html and "9.87" not in md  # a simulated policy never gets a speedup shown
    assert "n/a (simulated)" in md and "fake-sim" in md
    assert "quiet enough" in md and "too noisy" not in md
    for must in ("## Results", "## Compatibility", "## Environment", "Test CPU", "transformers 5.0"):
        assert must in md
    assert html.count("<svg") >= 5 and "<script" not in html
    for ext in ("http://", "https://"):
        assert all(ext not in line or "xmlns" in line or "creativecommons" in line for line in html.split(">"))
    assert html.count('class="tokens"') == 2  # one token view per policy that recorded a sample


def test_noisy_control_is_called_out():
    html, md = render_rows(rows(control=1.31))
    assert "too noisy" in md and "too noisy" in html


def test_at_a_glance_ignores_noise_and_disguised_dense():
    from ponder.eval.report.lm import best_points

    rs = rows()
    rs.append(_row("skipdecode", 1.0, perplexity_delta=0.0, flops_fraction=1.0, decode_speedup=1.16))  # dense plan
    rs.append(_row("ffn-skip", 0.9, perplexity_delta=0.001, flops_fraction=0.9, decode_speedup=1.05))  # in the noise
    bp = best_points(rs, tolerances=(0.005, 0.5))
    assert bp[0].startswith("no point within 0.5% perplexity") and "skipdecode" not in " ".join(bp)
    assert "<b>layer-drop</b> at budget 0.5" in bp[1]  # 1.9x at +25%: the fastest point that clears the band
    same = best_points(rs, tolerances=(0.3, 0.4, 0.5))  # one point wins all three: said once
    assert len(same) == 1 and same[0].startswith("within 30%, 40% and 50% perplexity of dense")


def test_older_settings_are_left_out(tmp_path):
    rs = rows()
    old = [{**r, "settings": "old", "perplexity_delta": 77.7} for r in rs[3:5]]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in old + rs) + "\n")
    paths = build_report(tmp_path)
    md = paths[-1].read_text()
    assert "+7770" not in md and "other settings" in md
    plot = tmp_path / "main-plot.svg"  # the main chart on its own, shown by report.md
    assert plot in paths and plot.read_text().count("<svg") == 1 and "](main-plot.svg)" in md


def test_svg_pieces():
    assert svg.nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svg.pareto([(1, 0.0), (1.5, 0.2), (1.2, 0.3), (2, 1.0)]) == [(1, 0.0), (1.5, 0.2), (2, 1.0)]
    c = svg.colours(["dense", "b", "a", "random"])
    assert c["dense"] == "#000000" and c["a"] != c["b"]
    assert depth_colour(0)[0] != depth_colour(1)[0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

PROBE = """<script>
window.addEventListener('load', () => {
  const s = [...document.querySelectorAll('svg.chart')].map(e => {
    const b = e.getBoundingClientRect();
    return [Math.round(b.width), Math.round(b.height), e.querySelectorAll('circle,rect,polygon').length];
  });
  const p = document.createElement('pre'); p.id = 'probe'; p.textContent = JSON.stringify(s);
  document.body.appendChild(p);
});
</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it with apt)")
def test_report_renders_in_headless_chromium(tmp_path):
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows()) + "\n")
    html_path = build_report(tmp_path)[0]
    # The report has no scripts; a copy gets a probe that writes each chart's laid-out size into the DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium(["--virtual-time-budget=3000", "--window-size=1300,2000", "--dump-dom", probe.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert dom.count("<svg") >= 5
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    sizes = json.loads(dom[start:dom.index("</pre>", start)])
    assert len(sizes) >= 5
    for w, h, marks in sizes:
        assert w > 200 and h > 150 and marks > 3  # laid out at a readable size, with points drawn
    shot = tmp_path / "shot.png"
    r = _chromium(["--window-size=1300,1800", f"--screenshot={shot}", html_path.as_uri()], tmp_path)
    assert r.returncode == 0 and shot.stat().st_size > 20_000  # a blank page compresses to a few KB
