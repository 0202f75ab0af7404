"""Which gradient estimator trains the best skip router in the same minutes (catalog F11.1)?

    .venv/bin/python benchmarks/router_estimators.py [--model smollm2] [--budget 0.75] [--minutes 8]

Each estimator (straight-through, hard Gumbel-sigmoid, REINFORCE with a running-mean baseline) trains a router from
the same start on the same batches in the same order for the same wall-clock minutes, one after the other (never two
at once on this machine); each router is then judged as a user gets it: offset fitted on the calibration text,
perplexity and realized fraction on the held-out files. Results go to benchmarks/results/router-estimators-<model>/
(results.json, report.md, each router and its card) as each estimator finishes; a rerun skips the finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ponder.train.router import ESTIMATORS, RouterTraining, run

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=float, default=0.75)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--tokens", type=int, default=196608)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    a = ap.parse_args(argv)
    out = ROOT / "benchmarks" / "results" / f"router-estimators-{Path(a.model).stem}"
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    for est in ESTIMATORS:
        if est in results:
            continue
        # the multiplier settings the stored comparison ran with (before the CLI's became the defaults)
        cfg = RouterTraining(a.budget, estimator=est, steps=100_000, minutes=a.minutes, dual_lr=0.5, rho=10.0)
        card = run(a.model, out / f"router-{est}", cfg, a.tokens, 0, a.eval_tokens, batch=4)
        results[est] = {"steps": card["training"]["steps"], "train_seconds": card["training"]["seconds"],
                        "final_train_kl": card["training"]["final_kl"],
                        "final_train_fraction": card["training"]["final_fraction"], "heldout": card["heldout"],
                        "machine": card["machine"]}
        res_path.write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Router estimators on {a.model}, budget {a.budget:g}, {a.minutes:g} training minutes each", "",
             "Same start, same batches, same minutes; judged with the offset fitted on the calibration text.", "",
             "| estimator | steps | train KL (last 10) | train fraction | code Δppl | code realized (std) | "
             "prose Δppl | prose realized (std) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for est, r in results.items():
        h = r["heldout"]
        c, p = h["code.txt"], h["prose.txt"]
        lines.append(f"| {est} | {r['steps']} | {r['final_train_kl']:.3f} | {r['final_train_fraction']:.3f} | "
                     f"{c['increase_pct']:+.1f}% | {c['realized']['fraction']:.3f} ({c['realized']['std']:.3f}) | "
                     f"{p['increase_pct']:+.1f}% | {p['realized']['fraction']:.3f} ({p['realized']['std']:.3f}) |")
    m = next(iter(results.values()))["machine"] if results else {}
    lines += ["", f"Machine: {m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads, torch {m.get('torch', '?')}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
