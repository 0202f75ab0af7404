"""Realization of a few decode points, measured apart from the bench: is a shortfall the policy's or the plan's?

    .venv/bin/python benchmarks/realization_probe.py [--specs ffn-skip@0.5 random@0.5 ...] [--rounds 25]

Times batch-1 greedy decode (the bench's first decode prompt, 32 new tokens, no counters) of dense, of a static
plan that skips the FFN of every middle layer for every token (what ffn-skip does at its cheapest, with no
decisions at all) and of each policy point, all interleaved round-robin in one process after warm-up. Prints each
one's median per-token time, its paired speedup over dense (median, min-max) and the speedup predicted from weight
bytes read (the bench's counting runs), and their ratio. The static plan's ratio is the ceiling the engine allows
an FFN-skipping policy on this machine; a policy well below it loses time in its own decisions. Not a test.
"""

from __future__ import annotations

import argparse

import torch

from ponder.api import load
from ponder.engine.generate import SamplingConfig, generate
from ponder.engine.plan import LayerPlan
from ponder.eval import timing
from ponder.eval.bench import Bench
from ponder.eval.points import BenchSettings
from ponder.policies import registry
from ponder.policies.base import StaticPlanner
from ponder.policies.spec import parse_policy


class _StaticFFNSkip:
    """Every middle layer's FFN skipped for every token, attention kept: a plan, not a policy."""

    name = "static-no-middle-ffn"

    def __init__(self, L: int):
        nof = LayerPlan(attn=None, ffn=torch.empty(0, dtype=torch.long))
        self.plans = [None] + [nof] * (L - 2) + [None]

    def generate(self, engine, prompts, sc, stats=None):
        return generate(engine, prompts, sc, lambda: StaticPlanner(self.plans), stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref")
    ap.add_argument("--specs", nargs="*", default=["ffn-skip@0.75", "ffn-skip@0.5"],
                    help="policy points as name[:key=value]@budget")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    e = load(args.model)
    b = Bench(e, BenchSettings.full(), out=None, model_id=args.model, fingerprint={}, show_progress=False)
    prompts = b.decode_prompts[:1]
    sc = SamplingConfig(max_new_tokens=32, temperature=0.0, stop_tokens=())
    pols = {"static-no-middle-ffn": _StaticFFNSkip(e.cfg.num_hidden_layers)}
    for spec in args.specs:
        name, _, budget = spec.rpartition("@")
        base, params = parse_policy(name)
        pol = registry.get(base, float(budget), **params)
        b.calibrate(pol)
        pols[spec] = pol

    def per_token(pol):
        def run():
            r = generate(e, prompts, sc, None, None) if pol is None else pol.generate(e, prompts, sc, None)
            return r.decode_s / max(1, len(r.tokens[0]) - 1)
        return run

    pred = {k: 1.0 / b.compute_fields(p)["decode_total_weight_bytes_fraction"] for k, p in pols.items()}
    fns = {"dense": per_token(None), **{k: per_token(p) for k, p in pols.items()}}
    t = timing.interleaved(fns, warmup=1, repeats=args.rounds, min_seconds=2.0)
    print(f"dense {t['dense']['median'] * 1e3:.3f} ms/token ({args.threads} threads, {e.dtype})")
    for k in pols:
        r = timing.paired_ratio(t["dense"], t[k])
        print(f"{k:28s} {t[k]['median'] * 1e3:.3f} ms/token  measured {r['median']:.2f}x "
              f"[{r['min']:.2f}-{r['max']:.2f}]  predicted {pred[k]:.2f}x  realization {r['median'] / pred[k]:.2f}")


if __name__ == "__main__":
    main()
