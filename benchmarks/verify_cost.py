"""What a forward of k new tokens costs on a warm cache, relative to one token, for ponder and llama.cpp.

    .venv/bin/python benchmarks/verify_cost.py [--model smollm2] [--prefix 200] [--ks 1,2,4,8] [--threads 2]
                                               [--decode 64] [--json OUT]

Why: speculative decoding verifies k drafted tokens in one forward; a drafter can only pay if that forward costs
little more than one token. Also times plain greedy decoding (ms/token) of ponder dense and llama.cpp on the same
prompt ids, on an F32 GGUF of the very weights ponder runs and on the original file, and checks greedy agreement.
Everything runs interleaved in one process (``ponder.eval.timing``). Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64, help="tokens for the decode timing (0: skip)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import ponder
    from ponder.engine.generate import SamplingConfig, generate
    from ponder.eval import envinfo, peers, quality, timing
    from ponder.eval.points import repo_data

    eng = ponder.load(a.model)
    ks = [int(k) for k in a.ks.split(",")]
    ids = eng.tokenizer.encode(repo_data("code.txt").read_text())[: a.prefix + max(ks)]
    prefix, new = ids[: a.prefix], ids[a.prefix:]
    cache = eng.new_cache(1, a.prefix + max(ks))
    eng.forward(torch.tensor([prefix]), cache, logits="last")

    def ponder_k(k: int):
        x = torch.tensor([new[:k]])

        def run():
            cache.truncate(a.prefix)
            eng.forward(x, cache, logits="all", phase="verify")
        return run

    fns = {f"ponder_k{k}": ponder_k(k) for k in ks}
    lcs = {}
    notes = []
    if not a.no_llamacpp and peers.llamacpp_version() is not None:
        files = {"llamacpp_f32": peers.f32_gguf_for(eng)}
        if eng.gguf is not None and eng.gguf.file_type != "F32":
            files[f"llamacpp_{eng.gguf.file_type.lower()}"] = eng.gguf.path
        for name, f in files.items():
            lc = peers.LlamaCpp(f, n_ctx=max(512, a.prefix + max(ks) + a.decode + 8), threads=a.threads,
                                logits_all=True)
            lc.prefill(prefix)
            lcs[name] = lc

            def lc_k(k: int, lc=lc):
                return lambda: lc.extend(new[:k], a.prefix)
            fns.update({f"{name}_k{k}": lc_k(k) for k in ks})
    elif not a.no_llamacpp:
        notes.append(f"llama.cpp not installed: {peers.LLAMACPP_HINT}")
    t = timing.interleaved(fns, warmup=2, repeats=a.repeats, min_seconds=1.0, max_repeats=40)
    out = {"env": envinfo.environment(eng.device, eng.dtype), "model": a.model, "weights": eng.weights_form,
           "prefix": a.prefix, "notes": notes, "verify_ms": {n: 1e3 * v["median"] for n, v in t.items()}}
    ratio = {}
    for side in ["ponder"] + list(lcs):
        one = t[f"{side}_k1"]["median"]
        ratio[side] = {k: round(t[f"{side}_k{k}"]["median"] / one, 3) for k in ks}
    out["verify_cost_vs_one_token"] = ratio
    if a.decode:
        p = ids[:32]
        sc = SamplingConfig(max_new_tokens=a.decode, temperature=0.0, stop_tokens=())
        dfns = {"ponder": lambda: generate(eng, [p], sc).decode_s / (a.decode - 1)}
        for name, lc in lcs.items():
            dfns[name] = (lambda lc=lc: lc.decode_step_s(p, a.decode))
        dt = timing.interleaved(dfns, warmup=1, repeats=5, min_seconds=2.0, max_repeats=15)
        out["decode_ms_per_token"] = {n: {k: round(1e3 * v[k], 3) for k in ("median", "min", "max")}
                                      for n, v in dt.items()}
        mine = generate(eng, [p], sc).tokens[0]
        out["greedy"] = {}
        for name, lc in lcs.items():
            theirs = lc.generate(p, a.decode)
            out["greedy"][name] = {"equal": theirs == mine, "first_divergence": quality.first_divergence(mine, theirs)}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
