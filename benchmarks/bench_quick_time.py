"""Check the `ponder bench --quick` time bound (< 5 minutes on 2 cores) and show where the time goes.

    .venv/bin/python benchmarks/bench_quick_time.py [--model ref] [--limit 300] [--keep DIR] [extra bench args...]

Runs the quick bench into a fresh folder, then prints the wall time, each point's seconds and its slowest phases
(calibration, perplexity, KL, greedy, probes, counters, timing, memory), so a slow policy is easy to spot.
Exit status 1 when the bound is missed. Not a test: it takes minutes and its result depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds allowed (default 300)")
    ap.add_argument("--keep", default=None, help="write results here instead of a temporary folder")
    args, rest = ap.parse_known_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ponder-quick-"))
    ponder = Path(sys.executable).with_name("ponder")
    cmd = [str(ponder), "bench", "--quick", "--model", args.model, "--out", str(out), "--no-progress", *rest]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()] \
        if (out / "results.jsonl").is_file() else []
    print(f"\nwall time {wall:.1f} s (limit {args.limit:.0f} s), exit status {rc}, {len(rows)} rows in {out}")
    for r in sorted(rows, key=lambda r: -(r.get("elapsed_s") or 0)):
        ph = sorted((r.get("phase_seconds") or {}).items(), key=lambda kv: -kv[1])[:4]
        phs = ", ".join(f"{k} {v:.1f}" for k, v in ph)
        el = r.get("elapsed_s")
        print(f"  {r['policy']:<22} {r['budget']:<5g} {el if el is None else round(el, 1)!s:>6} s   {phs}")
    return 0 if (rc == 0 and wall <= args.limit) else 1


if __name__ == "__main__":
    sys.exit(main())
