"""Batch-1 decode: ``torch.compile`` of the whole decode step (as gpt-fast does) against ponder's fused C++ halves.

    .venv/bin/python benchmarks/compile_vs_fused.py [--model smollm2] [--prefix 200] [--decode 64] [--threads 2]
                                                    [--mode default] [--json OUT]

Why: issue 15 asks to keep whichever is faster of a compiled decode path and the hand-fused C++ halves. The
compiled step here is gpt-fast's recipe: a static KV cache of fixed length, the new token's position as a tensor,
attention over the whole cache under a position mask, so one graph serves every step with no recompilation
(``fullgraph=True, dynamic=False``); it reads the engine's own fused weights. Timed interleaved with the engine's
dense decode (fused halves) and its Python reference halves, on the same prefix and the same greedy tokens, after
warm-up (compilation excluded and reported separately). Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch._inductor.config
import torch.nn.functional as F

import ponder
from ponder.engine.steps import PythonSteps
from ponder.eval import envinfo, timing
from ponder.eval.points import repo_data
from ponder.models.llama import apply_rope, rms_norm


def compiled_step(eng, max_len: int, mode: str):
    """A gpt-fast-style decode step over the engine's weights and a static (L, 1, Hk, max_len, hd) cache."""
    c = eng.cfg
    H, Hk, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    qdim, kvdim = H * hd, Hk * hd
    layers = eng.layers
    cos_t, sin_t = eng.rope(torch.arange(max_len)[None], max_len)  # (1, max_len, 1, hd)
    cos_t, sin_t = cos_t[0], sin_t[0]
    cols = torch.arange(max_len)

    def step(tok: torch.Tensor, pos: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tok, eng.embed).view(1, -1)  # (1, D)
        cos, sin = cos_t[pos], sin_t[pos]  # (1, 1, hd)
        mask = (cols <= pos).view(1, 1, 1, max_len)
        for i, w in enumerate(layers):
            qkv = F.linear(rms_norm(x, w.ln1, eps), w.wqkv, w.bqkv)
            q = apply_rope(qkv[:, :qdim].view(1, H, hd), cos, sin)
            k = apply_rope(qkv[:, qdim:qdim + kvdim].view(1, Hk, hd), cos, sin)
            v = qkv[:, qdim + kvdim:].view(1, Hk, hd)
            K[i].index_copy_(2, pos, k[:, :, None])
            V[i].index_copy_(2, pos, v[:, :, None])
            o = F.scaled_dot_product_attention(q[:, :, None], K[i], V[i], attn_mask=mask, enable_gqa=H != Hk)
            x = x + F.linear(o.reshape(1, qdim), w.wo)
            g, u = F.linear(rms_norm(x, w.ln2, eps), w.wgu[0]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, w.wd)
        return F.linear(rms_norm(x, eng.norm, eps), eng.head)

    return torch.compile(step, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    ap.add_argument("--freezing", action="store_true", help="inductor freezing: weights become constants (prepacked)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.freezing:
        torch._inductor.config.freezing = True
    torch.set_num_threads(a.threads)
    eng = ponder.load(a.model)
    if eng.steps.name != "cpp":
        print("the fused halves are not built here: nothing to compare against", file=sys.stderr)
        return 2
    ref_steps, fused_steps = PythonSteps(eng.cfg), eng.steps
    prefix = eng.tokenizer.encode(repo_data("code.txt").read_text())[: a.prefix]
    max_len = a.prefix + a.decode + 1
    cache = eng.new_cache(1, max_len)
    with torch.inference_mode():
        first = int(eng.forward(torch.tensor([prefix]), cache, logits="last").logits[0, -1].argmax())
    P = len(prefix)

    def engine_decode(steps):
        def run():
            eng.steps = steps
            cache.truncate(P)
            tok, out = first, []
            for _ in range(a.decode):
                lg = eng.forward(torch.tensor([[tok]]), cache, logits="last", phase="decode").logits
                tok = int(lg[0, -1].argmax())
                out.append(tok)
            eng.steps = fused_steps
            return out
        return run

    step = compiled_step(eng, max_len, a.mode)

    def compiled_decode():
        # gpt-fast keeps its own static cache; here it is the engine's cache storage (same layout), so both paths
        # attend over the same prefix K/V.
        tok, out = first, []
        for j in range(a.decode):
            with torch.inference_mode():
                lg = step(torch.tensor([tok]), torch.tensor([P + j]), cache.k, cache.v)
            tok = int(lg[0].argmax())
            out.append(tok)
        return out

    t0 = time.perf_counter()
    got = compiled_decode()  # compiles
    compile_s = time.perf_counter() - t0
    want = engine_decode(fused_steps)()
    fns = {"fused": engine_decode(fused_steps), "python": engine_decode(ref_steps), "compiled": compiled_decode}
    t = timing.interleaved(fns, warmup=1, repeats=5, min_seconds=2.0, max_repeats=15)
    ms = {n: {k: round(1e3 * v[k] / a.decode, 3) for k in ("median", "min", "max")} for n, v in t.items()}
    out = {"env": envinfo.environment(eng.device, eng.dtype), "model": a.model, "prefix": P, "decode": a.decode,
           "torch": torch.__version__, "mode": a.mode, "freezing": a.freezing, "compile_s": round(compile_s, 1),
           "ms_per_token": ms,
           "compiled_vs_fused": round(ms["compiled"]["median"] / ms["fused"]["median"], 3),
           "python_vs_fused": round(ms["python"]["median"] / ms["fused"]["median"], 3),
           "greedy_equal_compiled": got == want, "greedy_equal_python": engine_decode(ref_steps)() == want}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
