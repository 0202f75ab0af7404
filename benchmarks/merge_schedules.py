"""Where token merging on all-MiniLM-L6-v2 could still find cosine: merge schedules, and merge-compute-unmerge.

Not a test, and no timing: quality (cosine to the dense embedding) against the engine-counted FLOPs fraction only,
to ask whether any training-free merging schedule reaches cosine >= 0.99 at the ~0.55 of FLOPs that a 1.8x speedup
would need (issue 6). Two families:

- ``token-merge`` (ponder's policy: ToMe bipartite matching, merged tokens stay merged, virtual unmerging for
  pooling) with explicit merge ratios, on every layer or only on later / earlier layers, with the hidden-state or
  the key metric;
- merge -> compute -> unmerge per layer (ToMe for Stable Diffusion's scheme, prototyped here only): each layer merges
  similar tokens, runs attention (proportional) and/or the FFN on the merged rows, and adds each group's update back
  to every member's own residual stream, so tokens are never fused for good. Its FLOPs are counted analytically
  (projections, FFN and attention core per row), the same way the engine counts them.

    .venv/bin/python benchmarks/merge_schedules.py [--texts 128] [--json out.json]

Texts: every other passage of the first 2 x ``--texts`` of the shipped retrieval passages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def unmerge_encode(eng, seqs, ratio: float, layers: set[int], attn: bool,
                   ffn: bool) -> tuple[torch.Tensor, float, float]:
    """Embeddings (B, D) with per-layer merge -> compute -> unmerge; returns (embeddings, flops, dense flops)."""
    from ponder.encoders.reduce import bipartite_soft_matching, compaction, gather_rows, merge_wavg
    from ponder.models.bert import _ACTIVATIONS, attend, embed_tokens, key_bias, merge_heads, split_heads

    W, cfg = eng.W, eng.cfg
    D, H, Fd = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    act = _ACTIVATIONS[cfg.hidden_act]
    ids, lengths = eng.batch(seqs)
    B, T = ids.shape
    pos = torch.arange(T)[None]
    valid = pos < lengths[:, None]
    special = (pos == 0) | (pos == lengths[:, None] - 1)
    x = embed_tokens(W, ids, valid)
    flops = dense = 0.0

    def groups(t):
        mergeable = valid & ~special
        return bipartite_soft_matching(t, mergeable, torch.floor(mergeable.sum(1) * ratio).long())

    def merge(t, merged, dst):
        xs, tot = merge_wavg(t, valid.to(t.dtype), merged, dst)
        order, nv, o2n = compaction(valid & ~merged)
        return gather_rows(xs, order), gather_rows(tot, order), o2n.gather(1, dst), nv

    def unmerge(t, inv):
        return gather_rows(t, inv.clamp_min(0))

    def attention(w, t, bias):
        q, k, v = F.linear(t, w.wqkv, w.bqkv).split(D, dim=-1)
        o, _ = attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), bias, False)
        return F.linear(merge_heads(o), w.wo, w.bo)

    def mlp(w, t):
        return F.linear(act(F.linear(t, w.w1, w.b1)), w.w2, w.b2)

    for i in range(cfg.num_hidden_layers):
        w = W.layers[i]
        nd = float(lengths.sum())
        na = nf = nd
        if i in layers:
            merged, dst = groups(x)
            xm, sm, inv, nv = merge(x, merged, dst)
            nm = float(nv.sum()) if nv is not None else float(xm.shape[0] * xm.shape[1])
        if i in layers and attn:
            a = unmerge(attention(w, xm, key_bias(nv, sm, x.dtype)), inv)
            na = nm
        else:
            a = attention(w, x, key_bias(valid if not bool(valid.all()) else None, None, x.dtype))
        h = F.layer_norm(x + a, (D,), *w.ln1, cfg.layer_norm_eps)
        if i in layers and ffn:
            hm, _, inv2, _ = merge(h, merged, dst)
            f = unmerge(mlp(w, hm), inv2)
            nf = nm
        else:
            f = mlp(w, h)
        x = F.layer_norm(h + f, (D,), *w.ln2, cfg.layer_norm_eps)
        flops += na * 8 * D * D + nf * 4 * D * Fd + 4 * na * (na / B) * D
        dense += nd * (8 * D * D + 4 * D * Fd) + 4 * nd * (nd / B) * D
    vw = valid.to(x.dtype)
    return F.normalize((x * vw[..., None]).sum(1) / vw.sum(1, keepdim=True), dim=1), flops, dense


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from ponder.encoders.api import encode_ids, load_encoder, tokenize
    from ponder.encoders.engine import EncoderStats
    from ponder.encoders.policies.token_merge import TokenMerge
    from ponder.encoders.retrieval import load_retrieval

    torch.set_num_threads(a.threads)
    eng = load_encoder("minilm")
    passages, _ = load_retrieval()
    seqs = tokenize(eng, [p["text"] for p in passages[: 2 * a.texts : 2]])[0]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[dict] = []
    with torch.inference_mode():
        dense = encode_ids(eng, seqs, None, 32)

        def record(family: str, params: dict, emb: torch.Tensor, frac: float) -> None:
            c = (emb * dense).sum(1)
            r = {"family": family, **params, "flops_fraction": round(frac, 4), "cos_mean": round(float(c.mean()), 4),
                 "cos_p1": round(float(c.quantile(0.01)), 4)}
            rows.append(r)
            print(json.dumps(r), flush=True)

        for metric in ("hidden", "keys"):
            for layers in (None, (1, 2, 3, 4, 5), (2, 3, 4, 5), (0, 1, 2), (0, 1)):
                for ratio in (0.5, 0.35, 0.25, 0.15):
                    pol = TokenMerge(budget=0.5, metric=metric, layers=layers, merge_ratio=ratio)
                    st = EncoderStats(eng.cfg)
                    emb = encode_ids(eng, seqs, pol, 32, st)
                    record("token-merge", {"metric": metric, "layers": list(layers or range(6)), "merge_ratio": ratio},
                           emb, st.flops_fraction)
        for attn, ffn in ((True, True), (False, True)):
            for layers in (set(range(6)), set(range(1, 6)), set(range(2, 6))):
                for ratio in (0.5, 0.4, 0.3):
                    emb = torch.empty_like(dense)
                    fl = dl = 0.0
                    for s in range(0, len(order), 32):
                        idx = order[s:s + 32]
                        e, f, d = unmerge_encode(eng, [seqs[i] for i in idx], ratio, layers, attn, ffn)
                        emb[idx], fl, dl = e, fl + f, dl + d
                    record("merge-compute-unmerge", {"units": "attention+ffn" if attn else "ffn",
                                                     "layers": sorted(layers), "merge_ratio": ratio}, emb, fl / dl)
    best = max((r for r in rows if r["cos_mean"] >= 0.99), key=lambda r: -r["flops_fraction"], default=None)
    print("cheapest point with mean cosine >= 0.99:", json.dumps(best))
    if a.json:
        Path(a.json).write_text(json.dumps({"texts": len(seqs), "threads": a.threads, "torch": torch.__version__,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                            "rows": rows, "cheapest_cos_0.99": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
