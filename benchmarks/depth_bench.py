"""The training-free depth policies on one model: decode speed at batch 1, perplexity, realized budget.

Not a test: timings live here. Per (policy, budget) point, in one process on one set of weights:
- calibration on the shipped calibration text (never the evaluation data);
- perplexity on the first ``--tokens`` tokens of held-out code, with the engine-counted FLOPs fraction, and the
  realized budget (FLOPs fraction) per 256-token window of that text: mean, spread, min, max;
- greedy agreement with dense on held-out prompts (exact match of whole continuations, and the token share);
- decode time per token at batch 1, interleaved with dense (A/B/A/B, warm-up dropped, medians with min/max).

    .venv/bin/python benchmarks/depth_bench.py [--model ref] [--threads 2] [--points unified-skip:0.75,...]
                                                [--tokens 8192] [--json out.json]

A point is ``policy:budget`` or ``policy:budget:key=value:key=value`` (policy parameters, e.g.
``early-exit:0.8:kv_fill=kv-copy``, ``self-speculative:1:exit_layer=4``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POINTS = ("dense:1,self-speculative:1,unified-skip:0.9,unified-skip:0.75,ffn-skip:0.9,ffn-skip:0.8,"
                  "skipdecode:0.9,skipdecode:0.75,early-exit:0.9,early-exit:0.9:kv_fill=kv-copy,early-exit:0.75,"
                  "oracle:0.75")


def parse_point(s: str) -> tuple[str, float, dict]:
    parts = s.split(":")
    kw = {}
    for p in parts[2:]:
        k, v = p.split("=", 1)
        try:
            kw[k] = int(v)
        except ValueError:
            try:
                kw[k] = float(v)
            except ValueError:
                kw[k] = v
    return parts[0], float(parts[1]) if len(parts) > 1 else 1.0, kw


def main(argv: list[str] | None = None) -> int:
    from ponder.api import load
    from ponder.engine.generate import SamplingConfig, generate
    from ponder.engine.stats import Stats
    from ponder.errors import PonderError
    from ponder.eval import timing
    from ponder.eval.envinfo import environment
    from ponder.eval.metrics import evaluate_text, read_text, text_ids
    from ponder.eval.quality import cut_prompts, cut_windows
    from ponder.policies import registry
    from ponder.policies.budget import realized
    from ponder.policies.calibration import calibration_ids

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--points", default=DEFAULT_POINTS)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out code tokens scored for perplexity")
    ap.add_argument("--prompts", type=int, default=10, help="held-out prompts for greedy agreement")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-prompts", type=int, default=3, help="prompts per timed call (batch 1, one by one)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="skip perplexity, realized budget and greedy checks")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    eng = load(a.model)
    code = read_text(ROOT / "data" / "eval" / "code.txt")
    ids = text_ids(eng, code)
    windows = cut_windows(ids[:a.tokens], min(256, eng.cfg.max_position_embeddings), a.tokens)
    prompts = cut_prompts(ids, a.prompts, a.prompt_tokens, skip=a.tokens)  # beyond the scored prefix
    calib = calibration_ids(eng)
    sc = SamplingConfig(max_new_tokens=a.new_tokens)
    dense_greedy = [] if a.timing_only else [generate(eng, [p], sc).tokens[0] for p in prompts]
    dense_ppl = None if a.timing_only else evaluate_text(eng, code, None, max_tokens=a.tokens)["perplexity"]
    env = environment(eng.device, eng.dtype)
    print(json.dumps({"env": {k: env.get(k) for k in ("cpu", "threads", "torch", "device", "dtype") if k in env},
                      "dense_ppl": dense_ppl and round(dense_ppl, 4), "tokens": a.tokens}), flush=True)

    def per_token(pol, ps):
        """Seconds per decode step over the timing prompts (decode time over tokens produced after the first)."""
        def run():
            secs = steps = 0.0
            for prompt in ps:
                st = Stats(eng.cfg, record_tokens=False)
                res = (generate(eng, [prompt], sc, None, st) if pol is None else pol.generate(eng, [prompt], sc, st))
                secs += res.decode_s
                steps += max(1, len(res.tokens[0]) - 1)
            return secs / steps
        return run

    def quality_fields(row, pol):
        ev = evaluate_text(eng, code, pol, max_tokens=a.tokens)
        row.update(ppl=round(ev["perplexity"], 4), ppl_delta_pct=round(100 * (ev["perplexity"] / dense_ppl - 1), 3),
                   flops_fraction=round(ev["flops_fraction"], 4))
        if pol.planner(eng) is not None:
            row["realized_on_eval"] = realized(eng, pol, windows).summary()
        outs, extras, st_all = [], [], Stats(eng.cfg, record_tokens=False)
        for p in prompts:
            res = pol.generate(eng, [p], sc, st_all)
            outs.append(res.tokens[0])
            extras.append(res.extra)
        same = sum(o == d for o, d in zip(outs, dense_greedy))
        agree = sum(x == y for o, d in zip(outs, dense_greedy) for x, y in zip(o, d))
        row.update(greedy_identical=f"{same}/{len(prompts)}",
                   greedy_token_agreement=round(agree / sum(len(d) for d in dense_greedy), 4),
                   gen_flops_fraction=round(st_all.flops_fraction, 4),
                   gen_weight_bytes_fraction=round(st_all.total_weight_bytes_fraction, 4))
        if extras and extras[0]:
            keys = [k for k, v in extras[0].items() if isinstance(v, (int, float)) and v is not None]
            row["extra"] = {k: round(sum(e[k] for e in extras if e.get(k) is not None) / len(extras), 4)
                            for k in keys}

    rows = []
    for spec in a.points.split(","):
        name, budget, kw = parse_point(spec.strip())
        row: dict = {"point": spec, "policy": name, "budget": budget, **kw}
        t0 = time.perf_counter()
        try:
            pol = registry.get(name, budget, **kw)
            pol.calibrate(eng, calib)
        except PonderError as e:
            row["error"] = str(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        row["calibrate_s"] = round(time.perf_counter() - t0, 2)
        cal = {k: v for k, v in (getattr(pol, "calibration", {}) or {}).items() if k != "engine"}
        if cal:
            row["calibration"] = cal
        if not a.timing_only:
            quality_fields(row, pol)
        if not a.no_timing and pol.real:  # dense against itself is the noise control: it must read ~1.0
            tp = prompts[:a.timing_prompts]
            t = timing.interleaved({"dense": per_token(None, tp), "policy": per_token(pol, tp)},
                                   warmup=1, repeats=a.repeats, device=eng.device, min_seconds=1.0, max_repeats=25)
            row.update(decode_ms_dense=round(1e3 * t["dense"]["median"], 3),
                       decode_ms=round(1e3 * t["policy"]["median"], 3),
                       decode_speedup_b1=round(t["dense"]["median"] / t["policy"]["median"], 3),
                       decode_speedup_b1_range=[round(t["dense"]["min"] / t["policy"]["max"], 3),
                                                round(t["dense"]["max"] / t["policy"]["min"], 3)])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "dense_ppl": dense_ppl, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
