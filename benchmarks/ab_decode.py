"""Batch-1 decode speed of dense and of every real policy, for two source trees, in one paired run.

    .venv/bin/python benchmarks/ab_decode.py BEFORE_TREE AFTER_TREE [--rounds 2] [--budget 0.75] [--json OUT]

Why: a restructuring must not slow the engine down (issue 15). Two versions of the code cannot share one Python
process, so this alternates worker processes, before, after, before, after, on the same machine and the same inputs
(the SmolLM2 default model, a fixed code prompt, greedy, 48 new tokens, each policy calibrated on the shipped
calibration text at the same budget), and reports per policy the median ms/token of each side over all rounds, with
min/max, and the after/before ratio. Each tree uses its own kernel build directory. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

POLICIES = ["dense", "layer-drop", "random", "unified-skip", "ffn-skip", "early-exit", "skipdecode",
            "self-speculative"]

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(2)
import ponder
from ponder.engine.generate import SamplingConfig
from ponder.policies import registry
from ponder.policies.calibration import calibration_ids
budget, new, repeats = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
names = sys.argv[4].split(",")
eng = ponder.load("smollm2")
text = open(sys.argv[5]).read()
prompt = eng.tokenizer.encode(text)[:64]
calib = calibration_ids(eng)
sc = SamplingConfig(max_new_tokens=new, temperature=0.0, stop_tokens=())
out = {}
for n in names:
    pol = registry.get(n, 1.0 if n in ("dense", "self-speculative") else budget)
    try:
        pol.calibrate(eng, calib)
    except Exception as e:
        out[n] = {"error": str(e)}
        continue
    pol.generate(eng, [prompt], sc)  # warm-up
    ms, toks = [], None
    for _ in range(repeats):
        r = pol.generate(eng, [prompt], sc)
        ms.append(1e3 * r.decode_s / (len(r.tokens[0]) - 1))
        toks = r.tokens[0]
    out[n] = {"ms": ms, "tokens": toks}
print("RESULT " + json.dumps(out))
"""


def run_worker(script: str, tree: Path, kernel_dir: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PONDER_KERNEL_DIR": kernel_dir}
    data = str(tree / "data" / "eval" / "code.txt")
    p = subprocess.run([sys.executable, script, str(a.budget), str(a.new), str(a.repeats), ",".join(a.policies),
                        data], env=env, capture_output=True, text=True, cwd=tree)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"worker in {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--budget", type=float, default=0.75)
    ap.add_argument("--policies", type=lambda s: s.split(","), default=POLICIES)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sides = {"before": (a.before.resolve(), tempfile.mkdtemp(prefix="kern_before_")),
             "after": (a.after.resolve(), tempfile.mkdtemp(prefix="kern_after_"))}
    got: dict[str, dict[str, list]] = {s: {} for s in sides}
    tokens: dict[str, dict[str, list]] = {s: {} for s in sides}
    script = Path(tempfile.mkdtemp(prefix="ab_decode_")) / "worker.py"
    script.write_text(WORKER)
    for r in range(a.rounds):
        for s, (tree, kd) in sides.items():
            res = run_worker(str(script), tree, kd, a)
            for n, v in res.items():
                if "ms" in v:
                    got[s].setdefault(n, []).extend(v["ms"])
                    tokens[s][n] = v["tokens"]
            print(f"round {r + 1} {s}: " + ", ".join(f"{n} {statistics.median(v['ms']):.2f}" for n, v in res.items()
                                                     if "ms" in v), file=sys.stderr, flush=True)
    rows = {}
    for n in a.policies:
        b, f = got["before"].get(n), got["after"].get(n)
        if not b or not f:
            rows[n] = {"error": "missing on one side"}
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        rows[n] = {"before_ms": [round(mb, 3), round(min(b), 3), round(max(b), 3)],
                   "after_ms": [round(mf, 3), round(min(f), 3), round(max(f), 3)],
                   "after_over_before": round(mf / mb, 3),
                   "same_tokens": tokens["before"][n] == tokens["after"][n]}
    out = {"budget": a.budget, "new_tokens": a.new, "rounds": a.rounds, "repeats": a.repeats,
           "before": str(a.before), "after": str(a.after), "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
