"""The ``ponder bench`` and ``ponder report`` subcommands (registered by ``ponder.cli``).

``--task`` selects what is benchmarked: ``lm`` (the default, ``run_lm`` here) or ``embed`` (the encoder bench,
``ponder.encoders.bench.run_cli``, which reuses ``timing``, ``envinfo``, ``sweep`` and ``report``); ``TASKS`` maps
each name to its function, called with the parsed arguments and returning an exit status. ``--model`` defaults to
None so each task picks its own default model; ``--policies`` / ``--budgets`` are None when not given.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..encoders.bench import run_cli as run_embed
from ..errors import PonderError
from ..models.catalog import DEFAULT_MODEL
from .bench import run_lm_bench
from .longctx import PROFILES as LONG_PROFILES
from .longctx import SECTIONS, run_long_bench
from .points import DEFAULT_BUDGETS, QUICK_BUDGETS, default_policies, profile_settings
from .report.build import build_report
from .report.page import md_headline
from .sweep import RESULTS, parse_budgets, print_summary

DEFAULT_OUT = "bench-results"


def cmd_bench(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise PonderError(f"unknown --task {args.task!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[args.task](args)


def run_lm(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.policies in (None, "", "all"):
        policies = default_policies()
    else:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if not policies:
            raise PonderError("--policies is empty; give names like dense,random,layer-drop (see `ponder policies`)")
        # names or specs (name:key=value;...): run_lm_bench checks each (plan_points) before loading anything
    budgets = parse_budgets(args.budgets) if args.budgets else list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    prose = args.prose
    overrides: dict[str, Any] = dict(
        data=args.data, ppl_tokens=args.tokens, kl_tokens=args.kl_tokens, prompts=args.prompts,
        new_tokens=args.new_tokens, probes=args.probes, repeats=args.repeats, warmup=args.warmup,
        decode_batch=args.batch)
    if prose is not None:
        overrides["prose"] = None if prose.lower() == "none" else prose
        if prose.lower() == "none":
            overrides["prose_tokens"] = 0
        elif args.quick:
            overrides["prose_tokens"] = args.tokens or 2048
    if args.no_peer:
        overrides["peer"] = False
    for k in ("tokens", "kl_tokens", "prompts", "new_tokens", "repeats", "batch"):
        v = getattr(args, k)
        if v is not None and v < (0 if k in ("prompts",) else 1):
            raise PonderError(f"--{k.replace('_', '-')} must be positive, got {v}")
    settings = profile_settings(args.quick, **overrides)
    summary = run_lm_bench(args.model or DEFAULT_MODEL, policies, budgets, args.out, settings, dtype=args.dtype,
                           device=args.device, weights=args.weights, quantize=args.quantize,
                           show_progress=not args.no_progress and not args.json, write_report=not args.no_report)
    return print_summary(summary, args.json, "bench", "point(s) measured", md_headline)


TASKS: dict[str, Callable[[argparse.Namespace], int]] = {"lm": run_lm, "embed": run_embed}


def cmd_report(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if not (d / RESULTS).is_file():
        raise PonderError(f"{d} holds no {RESULTS}; run `ponder bench --out {d}` first")
    paths = build_report(d)
    if args.json:
        print(json.dumps({"report": [str(p) for p in paths]}))
    else:
        print("report: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_bench_long(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    eng = load(model, weights=args.weights)
    out = args.out or f"benchmarks/results/long-{args.profile}-{Path(model).stem}"
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip()) if args.sections else SECTIONS
    meta = run_long_bench(eng, model, args.weights, args.profile, out, kvpress_peer=not args.no_kvpress,
                          threads=torch.get_num_threads(), sections=sections,
                          say=(lambda m: None) if args.json else (lambda m: print(f"[long] {m}", flush=True)))
    if args.json:
        print(json.dumps({"out": out, "profile": meta["profile"], "seconds": meta["seconds"],
                          "kvpress": meta.get("kvpress")}))
    else:
        print((Path(out) / "report.md").read_text())
        print(f"results: {out}/results.jsonl, report: {out}/report.md ({meta['seconds'] / 60:.1f} min)")
    return 0


def add_subcommand(sub: Any) -> None:
    lb = sub.add_parser("bench-long", help="KV-selection policies at long context: quality, retrieval, time and "
                                           "memory, with kvpress side by side",
                        description="Runs every KV-selection policy on long held-out windows (quality of the "
                                    "continuation after the cut, retrieval probes, decode time and peak memory) "
                                    "and kvpress's presses on the same inputs in their own environment "
                                    "(scripts/setup_kvpress.sh). Writes OUT/results.jsonl as it goes (a rerun "
                                    "resumes) and OUT/report.md.")
    lb.add_argument("--model", default=DEFAULT_MODEL)
    lb.add_argument("--profile", default="quick", choices=tuple(LONG_PROFILES))
    lb.add_argument("--weights", default="float32", choices=("native", "float32"),
                    help="float32 (default: the form the long-context targets are stated in) or native")
    lb.add_argument("--out", default=None, help="results folder (default: benchmarks/results/long-PROFILE-MODEL)")
    lb.add_argument("--no-kvpress", action="store_true", help="skip the kvpress peer")
    lb.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all, in that order)")
    lb.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    lb.add_argument("--json", action="store_true")
    lb.set_defaults(fn=cmd_bench_long)

    b = sub.add_parser("bench", help="sweep policies x budgets against dense; writes results.jsonl and a report",
                       description="Measure quality, compute and time of every policy at every budget against the "
                                   "dense model, in one process on the same weights. Appends one JSON line per "
                                   "point to OUT/results.jsonl (a rerun skips finished points) and writes "
                                   "OUT/report.html and OUT/report.md.")
    b.add_argument("--model", default=None,
                   help="smollm2 (default for --task lm), ref, a Hugging Face checkpoint folder or a .gguf file")
    b.add_argument("--task", default="lm", help="what to benchmark: lm (default) or embed (encoder models)")
    b.add_argument("--policies", default=None, help="comma-separated policy names (default: every registered one, plus "
                        "self-speculative:drafter=lookup); a variant with its own "
                        "parameters is name:key=value;key=value, e.g. self-speculative:drafter=lookup+layers")
    b.add_argument("--budgets", default=None,
                   help="comma-separated budgets in (0, 1] (default: 0.9,0.75,0.6,0.5; --quick: 0.9,0.75)")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: ./{DEFAULT_OUT})")
    b.add_argument("--quick", action="store_true",
                   help="a small but complete sweep (every policy, two budgets, small samples): minutes, not tens")
    b.add_argument("--data", default=None, help="evaluation text file (default: the shipped held-out code)")
    b.add_argument("--prose", default=None, help="second text for perplexity (default: shipped prose; 'none' to skip)")
    b.add_argument("--tokens", type=int, default=None, help="tokens of --data scored for perplexity")
    b.add_argument("--kl-tokens", type=int, default=None, help="tokens compared with dense for KL / top-1 agreement")
    b.add_argument("--prompts", type=int, default=None, help="greedy prompts compared with dense")
    b.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt")
    b.add_argument("--probes", type=int, default=None, help="probes from data/eval/probes.jsonl (0: none)")
    b.add_argument("--batch", type=int, default=None, help="batch size of the second decode timing (default 8)")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (after warm-up)")
    b.add_argument("--warmup", type=int, default=None, help="discarded warm-up rounds")
    b.add_argument("--no-peer", action="store_true", help="do not time transformers' generate as a peer")
    b.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    b.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    b.add_argument("--weights", default=None, choices=("native", "float32"),
                   help="native: a GGUF's Q8_0/Q4_0/Q4_1 blocks through ponder's kernels (default for a quantised "
                        "file on CPU); float32: dequantised")
    b.add_argument("--quantize", default=None, choices=("q8_0", "q4_0", "q4_1"),
                   help="quantise a float model at load and bench it natively")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    b.add_argument("--json", action="store_true", help="print one JSON summary instead of the table")
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("report", help="write report.html and report.md for a bench results folder")
    r.add_argument("dir", help="a folder holding results.jsonl")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_report)

