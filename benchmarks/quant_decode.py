"""Native block-quantised weights against llama.cpp on the same file, and against ponder's own float32 path.

    .venv/bin/python benchmarks/quant_decode.py [--threads 2] [--decode 64] [--prefill 512] [--ppl-tokens 2048]
                                                [--prompts 8] [--out benchmarks/results/quant-smollm2]

What it measures, all in one process, interleaved rounds after warm-up (``ponder.eval.timing``), medians with min
and max, the machine recorded:
- decode ms/token at batch 1: ponder native and llama.cpp on the shipped Q4_1 file, and on a Q8_0 file of the same
  weights (written here with the reference quantiser; both engines read that one file); ponder float32 beside them;
- prefill of ``--prefill`` tokens on the same files;
- a forward of k new tokens on a warm cache (the cost of verifying k drafted tokens) relative to one token;
- quality of the native path against the dequantised float32 path: perplexity on held-out code and prose, greedy
  tokens on ``--prompts`` code prompts (share equal, first-divergence positions), and llama.cpp's tokens on the
  same file against ponder native's;
- the headline: ponder's lossless self-speculation (draft head) on the Q4_1 file against llama.cpp dense on it,
  with ponder's output checked identical to ponder dense.
Writes ``OUT/results.json`` and a line in ``benchmarks/results/HISTORY.md``. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

import ponder
from ponder.engine import SamplingConfig, generate
from ponder.eval import envinfo, peers, quality, timing
from ponder.eval.metrics import evaluate_text
from ponder.eval.points import repo_data
from ponder.models.gguf import write_gguf
from ponder.policies import registry


def _ms(t: dict) -> dict:
    return {k: round(1e3 * t[k], 3) for k in ("median", "min", "max")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=200, help="warm cache for the k-token forwards")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per prompt for the agreement check")
    ap.add_argument("--out", default="benchmarks/results/quant-smollm2")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if peers.llamacpp_version() is None:
        print(f"llama.cpp is not installed: {peers.LLAMACPP_HINT}", file=sys.stderr)
        return 2
    t_start = dt.datetime.now(dt.UTC)
    q41 = ponder.load(a.model, weights="native")
    f32 = ponder.load(a.model, weights="float32")
    cache = peers.f32_gguf_for(f32).parent
    q8_file = cache / f"{q41.gguf.path.stem}-requant.Q8_0.gguf"
    if not q8_file.is_file():
        write_gguf(q8_file, f32.model.state_dict(), f32.cfg, f32.gguf.fields, qtype="Q8_0")
    q8 = ponder.load(q8_file, weights="native")
    engines = {"q4_1": q41, "q8_0": q8}
    text = repo_data("code.txt").read_text()
    ids = q41.tokenizer.encode(text)
    ks = [int(k) for k in a.ks.split(",")]
    n_ctx = max(1024, a.prefill + 16, a.prefix + max(ks) + 16)
    lc = {n: peers.LlamaCpp(e.gguf.path, n_ctx=n_ctx, threads=a.threads) for n, e in engines.items()}
    out: dict = {"env": envinfo.environment(q41.device, q41.dtype), "model": a.model, "threads": a.threads,
                 "weights": {n: e.weights_form for n, e in engines.items()} | {"float32": f32.weights_form},
                 "files": {n: e.gguf.path.name for n, e in engines.items()},
                 "llama_cpp": peers.llamacpp_version()}

    # ---- decode, batch 1 -------------------------------------------------------------------------------------
    p = ids[:32]
    sc = SamplingConfig(max_new_tokens=a.decode, temperature=0.0, stop_tokens=())
    fns = {}
    for n, e in {**engines, "float32": f32}.items():
        fns[f"ponder_{n}"] = (lambda e=e: generate(e, [p], sc).decode_s / (a.decode - 1))
    for n, m in lc.items():
        fns[f"llamacpp_{n}"] = (lambda m=m: m.decode_step_s(p, a.decode))
    t = timing.interleaved(fns, warmup=1, repeats=5, min_seconds=2.0, max_repeats=15)
    out["decode_ms_per_token"] = {n: _ms(v) for n, v in t.items()}
    out["decode_vs_llamacpp"] = {n: round(t[f"ponder_{n}"]["median"] / t[f"llamacpp_{n}"]["median"], 3)
                                 for n in engines}
    print("decode", json.dumps(out["decode_ms_per_token"]), flush=True)

    # ---- prefill ---------------------------------------------------------------------------------------------
    pre = ids[: a.prefill]
    x = torch.tensor([pre])
    fns = {}
    for n, e in engines.items():
        fns[f"ponder_{n}"] = (lambda e=e: e.forward(x, e.new_cache(1, len(pre)), logits="last"))
        fns[f"llamacpp_{n}"] = (lambda m=lc[n]: m.prefill(pre))
    t = timing.interleaved(fns, warmup=1, repeats=3, min_seconds=2.0, max_repeats=8)
    out["prefill_ms"] = {"tokens": len(pre)} | {n: _ms(v) for n, v in t.items()}
    out["prefill_vs_llamacpp"] = {n: round(t[f"ponder_{n}"]["median"] / t[f"llamacpp_{n}"]["median"], 3)
                                  for n in engines}
    print("prefill", json.dumps(out["prefill_ms"]), flush=True)

    # ---- k new tokens on a warm cache ------------------------------------------------------------------------
    prefix, new = ids[: a.prefix], ids[a.prefix: a.prefix + max(ks)]
    kc = q41.new_cache(1, a.prefix + max(ks))
    q41.forward(torch.tensor([prefix]), kc, logits="last")
    lck = peers.LlamaCpp(q41.gguf.path, n_ctx=n_ctx, threads=a.threads, logits_all=True)
    lck.prefill(prefix)

    def ponder_k(k: int):
        xk = torch.tensor([new[:k]])

        def run():
            kc.truncate(a.prefix)
            q41.forward(xk, kc, logits="all", phase="verify")
        return run

    fns = {f"ponder_k{k}": ponder_k(k) for k in ks}
    fns.update({f"llamacpp_k{k}": (lambda k=k: lck.extend(new[:k], a.prefix)) for k in ks})
    t = timing.interleaved(fns, warmup=2, repeats=7, min_seconds=1.0, max_repeats=40)
    out["k_tokens_ms"] = {n: _ms(v) for n, v in t.items()}
    out["k_tokens_vs_one"] = {side: {k: round(t[f"{side}_k{k}"]["median"] / t[f"{side}_k1"]["median"], 3)
                                     for k in ks} for side in ("ponder", "llamacpp")}
    print("k tokens", json.dumps(out["k_tokens_vs_one"]), flush=True)

    # ---- quality: native against float32 on the same blocks ---------------------------------------------------
    qual = {}
    for name, path in (("code", repo_data("code.txt")), ("prose", repo_data("prose.txt"))):
        txt = path.read_text()
        r = {n: evaluate_text(e, txt, max_tokens=a.ppl_tokens) for n, e in {"native": q41, "float32": f32}.items()}
        pn, pf = r["native"]["perplexity"], r["float32"]["perplexity"]
        qual[name] = {"tokens": r["native"]["tokens_scored"], "ppl_native": round(pn, 4),
                      "ppl_float32": round(pf, 4), "ppl_increase_pct": round(100 * (pn / pf - 1), 3)}
    step = len(ids) // (a.prompts + 1)
    prompts = [ids[i * step: i * step + 64] for i in range(a.prompts)]
    gsc = SamplingConfig(max_new_tokens=a.new, temperature=0.0, stop_tokens=())
    nat = [generate(q41, [pp], gsc).tokens[0] for pp in prompts]
    flt = [generate(f32, [pp], gsc).tokens[0] for pp in prompts]
    lcq = [lc["q4_1"].generate(pp, a.new) for pp in prompts]
    qual["greedy_native_vs_float32"] = quality.exact_match(flt, nat) | {
        "first_divergence": [quality.first_divergence(x, y) for x, y in zip(flt, nat)]}
    qual["greedy_llamacpp_vs_native_same_file"] = quality.exact_match(nat, lcq) | {
        "first_divergence": [quality.first_divergence(x, y) for x, y in zip(nat, lcq)]}
    out["quality"] = qual
    print("quality", json.dumps(qual), flush=True)

    # ---- headline: lossless speculation on the Q4_1 file against llama.cpp dense on it ------------------------
    head = registry.get("self-speculative", drafter="head")
    dense = registry.get("dense")
    cprompts = prompts[: min(4, len(prompts))]
    hsc = SamplingConfig(max_new_tokens=a.decode, temperature=0.0, stop_tokens=())
    same = all(head.generate(q41, [pp], hsc).tokens[0] == dense.generate(q41, [pp], hsc).tokens[0]
               for pp in cprompts)

    def per_token(pol):
        return lambda: sum(pol.generate(q41, [pp], hsc).decode_s for pp in cprompts) / (len(cprompts) * (a.decode - 1))

    fns = {"ponder_dense": per_token(dense), "ponder_self_speculative_head": per_token(head),
           "llamacpp_dense": lambda: sum(lc["q4_1"].decode_step_s(pp, a.decode) for pp in cprompts) / len(cprompts)}
    t = timing.interleaved(fns, warmup=1, repeats=3, min_seconds=2.0, max_repeats=8)
    out["headline_q4_1"] = {"prompts": len(cprompts), "new_tokens": a.decode, "identical_to_ponder_dense": same,
                            "ms_per_token": {n: _ms(v) for n, v in t.items()},
                            "speculative_vs_llamacpp_dense": round(t["llamacpp_dense"]["median"]
                                                                   / t["ponder_self_speculative_head"]["median"], 3),
                            "speculative_vs_ponder_dense": round(t["ponder_dense"]["median"]
                                                                 / t["ponder_self_speculative_head"]["median"], 3)}
    print("headline", json.dumps(out["headline_q4_1"]), flush=True)
    out["elapsed_s"] = round((dt.datetime.now(dt.UTC) - t_start).total_seconds(), 1)

    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    hist = Path("benchmarks/results/HISTORY.md")
    dm, pf = out["decode_ms_per_token"], out["prefill_ms"]
    line = (f"| {t_start.date()} | {d.name} | {str(out['env'].get('git_commit', ''))[:7]} | {a.threads} threads | - "
            f"| `benchmarks/quant_decode.py`: decode Q4_1 ponder "
            f"{dm['ponder_q4_1']['median']:.2f} / llama.cpp {dm['llamacpp_q4_1']['median']:.2f} ms, Q8_0 "
            f"{dm['ponder_q8_0']['median']:.2f} / {dm['llamacpp_q8_0']['median']:.2f}; prefill {pf['tokens']} Q4_1 "
            f"{pf['ponder_q4_1']['median']:.0f} / {pf['llamacpp_q4_1']['median']:.0f} ms; k=2/4/8 "
            f"{'/'.join(str(out['k_tokens_vs_one']['ponder'][k]) for k in ks[1:])}x; ppl code "
            f"{qual['code']['ppl_increase_pct']:+.2f}% prose {qual['prose']['ppl_increase_pct']:+.2f}%; spec vs "
            f"llama.cpp {out['headline_q4_1']['speculative_vs_llamacpp_dense']}x |\n")
    if hist.is_file():
        with hist.open("a") as f:
            f.write(line)
    print(json.dumps(out, indent=1))
    return 0 if not math.isnan(out["decode_vs_llamacpp"]["q4_1"]) else 1


if __name__ == "__main__":
    sys.exit(main())
