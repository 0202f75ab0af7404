"""The ``ponder`` command. Every user-fixable problem is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .api import load
from .encoders import cli as embed_cli
from .engine.generate import SamplingConfig
from .errors import PonderError
from .eval import bench_cli
from .eval.metrics import evaluate_text, read_text
from .eval.points import repo_data
from .eval.prompts import write_instruct
from .models.catalog import available
from .models.gguf_tokenizer import render_chat
from .policies import kv, registry
from .policies.calibration import calibration_ids
from .policies.spec import parameters
from .train import draft, heal, router, translators
from .train.corpus import build_all
from .train.probes import build_eval
from .train.recipe import main as train_main


def _add_model_args(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default), ref, a local Hugging Face checkpoint folder, or a .gguf file "
                        "(see `ponder models`)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--weights", default=None, choices=("native", "float32"),
                   help="native: run a GGUF's Q8_0/Q4_0/Q4_1 blocks as they are, with ponder's kernels (default for "
                        "a quantised file on CPU); float32: dequantise them")
    p.add_argument("--quantize", default=None, choices=("q8_0", "q4_0", "q4_1"),
                   help="quantise a float model's matrices at load (the embedding in q8_0 for the 4-bit types) and "
                        "run them natively")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    if policy:
        p.add_argument("--policy", default="dense", help="compute policy (see `ponder policies`)")
        p.add_argument("--budget", type=float, default=1.0, help="fraction of dense layer FLOPs, in (0, 1]")
        p.add_argument("--router", default=None, help="a router adapter (`ponder train router`) for the router and "
                                                      "first policies (default: the one shipped for the model)")
        p.add_argument("--kv", default=None, help="a KV-selection policy (see `ponder policies`): the prompt's KV "
                                                  "cache is cut to --kv-budget of its tokens after prefill")
        p.add_argument("--kv-budget", type=float, default=0.5, help="fraction of the prompt's KV kept, in (0, 1]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of human output")


def _setup(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    eng = load(args.model, dtype=args.dtype, device=args.device, weights=args.weights, quantize=args.quantize)
    if eng.tokenizer is None:
        raise PonderError(f"{eng.path} has no tokenizer; the CLI needs one to read and write text")
    return eng


def _policy(args: argparse.Namespace, engine):
    kw = {}
    if getattr(args, "router", None):
        if not Path(args.router).is_file():
            raise PonderError(f"--router {args.router} does not exist; train one with `ponder train router`")
        kw["router"] = args.router
    pol = registry.get(args.policy, args.budget, **kw)
    calibrate(pol, engine)
    return pol


def calibrate(pol, engine) -> None:
    """Calibrate on the shipped calibration text (never the evaluation data)."""
    pol.calibrate(engine, calibration_ids(engine))


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The conversation of ``--chat TEXT`` (one user turn) or ``--chat-file FILE`` (a JSON list of {role, content}),
    or None for a plain ``--prompt``."""
    if args.chat_file:
        p = Path(args.chat_file)
        try:
            msgs = json.loads(p.read_text())
        except FileNotFoundError:
            raise PonderError(f"--chat-file {p} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PonderError(f"--chat-file {p} is not valid JSON ({e}); give a list of "
                              '{"role": ..., "content": ...} objects') from None
        if isinstance(msgs, dict) and "messages" in msgs:
            msgs = msgs["messages"]
        return msgs
    if args.chat is not None:
        if not args.chat.strip():
            raise PonderError("the chat message is empty; pass --chat TEXT")
        return [{"role": "user", "content": args.chat}]
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    n_given = sum(x is not None for x in (args.prompt, args.chat, args.chat_file))
    if n_given != 1:
        raise PonderError("give exactly one of --prompt TEXT, --chat TEXT or --chat-file FILE")
    if args.prompt is not None and not args.prompt:
        raise PonderError("the prompt is empty; pass --prompt TEXT")
    msgs = chat_messages(args)
    eng = _setup(args)
    pol = _policy(args, eng)
    if msgs is not None:
        if not eng.chat_template:
            raise PonderError(f"model {args.model} has no chat template; use --prompt TEXT instead of --chat")
        prompt_text = render_chat(eng.chat_template, msgs, add_generation_prompt=True)
    else:
        prompt_text = args.prompt
    ids = eng.tokenizer.encode(prompt_text)
    if not ids:
        raise PonderError("the prompt is empty; pass --prompt TEXT")
    stop = tuple(eng.stop_tokens) if not args.ignore_eos else ()
    sc = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_tokens=stop)
    stats = eng.new_stats()
    streamed: list[int] = []
    printed = [0]

    def on_token(row: int, tok: int) -> None:  # stream decoded text as it grows (a stop token is not text)
        if args.json or tok in stop:
            return
        streamed.append(tok)
        text = eng.tokenizer.decode(streamed)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)

    if not args.json and msgs is None:
        sys.stdout.write(prompt_text)
    if getattr(args, "kv", None):
        if pol.name != "dense":
            raise PonderError("--kv cannot be combined with a depth --policy yet; run one or the other")
        pol = kv.get(args.kv, args.kv_budget)
    res = pol.generate(eng, [ids], sc, stats, on_token)
    toks = res.tokens[0]
    text = eng.tokenizer.decode([t for t in toks if t not in stop])
    dt = res.decode_s
    summary = {**stats.summary(), "prefill_s": round(res.prefill_s, 4), "decode_s": round(dt, 4),
               "decode_tokens_per_s": round((len(toks) - 1) / dt, 2) if dt > 0 and len(toks) > 1 else None,
               "finish": res.finish[0], **{k: v for k, v in res.extra.items() if not hasattr(v, "shape")}}
    depth = [int(x) for m in stats.layers_used() for x in m[0].tolist()]
    if args.json:
        print(json.dumps({"text": text, "token_ids": toks, "prompt_tokens": len(ids), "policy": pol.describe(),
                          "model": str(args.model), "weights": eng.weights_form,
                          "stats": summary, "layers_per_token": depth}))
    else:
        sys.stdout.write("\n")
        x = res.extra
        held = (f"; KV held {x['kv_tokens']} slots per head at full precision, {x['kv_bytes'] / 2**20:.1f} MiB"
                if "kv_tokens" in x else "")
        print(f"[{len(toks)} tokens, {res.finish[0]}; policy {pol.name} budget {pol.budget:g}; "
              f"flops {summary['flops_fraction']:.3f} of dense{held}]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    text = read_text(args.data)
    eng = _setup(args)
    pol = _policy(args, eng)
    bar = None
    if not args.json:
        bar = tqdm(desc="scoring", unit="win", file=sys.stderr, dynamic_ncols=True)
    r = evaluate_text(eng, text, pol, window=args.window, stride=args.stride,
                      progress=(bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    r.pop("logprobs")
    out = {"model": str(args.model), "data": str(args.data), "policy": pol.describe(), **r}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.data}: perplexity {r['perplexity']:.3f}, {r['bits_per_byte']:.4f} bits/byte over "
              f"{r['tokens_scored']} tokens ({r['bytes']} bytes); policy {pol.name} budget {pol.budget:g}, "
              f"flops {r['flops_fraction']:.3f} of dense")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    rows = []
    for n in registry.names():
        cls = registry._REGISTRY[n]
        params = {k: (f.default if f.default is not dataclasses.MISSING else None)
                  for k, f in parameters(cls).items()}
        rows.append({"policy": n, **cls.flags(), "doc": (cls.__doc__ or "").strip().splitlines()[0],
                     "params": params})
    kv_rows = []
    for n in kv.names():
        kcls = kv.registry._REGISTRY[n]
        kv_rows.append({"policy": n, "axis": "kv", **kcls.flags(),
                        "doc": (sys.modules[kcls.__module__].__doc__ or "").strip().splitlines()[0],
                        "params": {k: f.default for k, f in parameters(kcls).items() if k != "tokens"}})
    if args.json:
        print(json.dumps(rows + kv_rows, default=str))
    else:
        for r in rows:
            fl = " ".join(k for k in ("real", "kv_compatible", "batch_compatible", "training_free", "lossless") if r[k])
            print(f"{r['policy']:<18} {fl:<60} {r['doc']}")
            if r["params"]:
                print(" " * 19 + "parameters: " + ", ".join(f"{k}={'none' if v is None else v}"
                                                            for k, v in r["params"].items()))
        print("\nA variant is name:key=value;key=value, e.g. --policy early-exit:kv_fill=kv-copy (budget: --budget).")
        print("\nKV-selection policies (--kv NAME --kv-budget F: the fraction of the prompt's KV cache kept):")
        for r in kv_rows:
            print(f"{r['policy']:<18} saves {'+'.join(r['saves']):<14} {r['doc']}")
            if r["params"]:
                print(" " * 19 + "parameters: " + ", ".join(f"{k}={v}" for k, v in r["params"].items()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = available()
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        mark = " (default)" if r["default"] else ""
        state = f"{r['file_mb']} MB at {r['path']}" if r["installed"] else f"not installed: {r['path']}"
        print(f"{r['name']}{mark}: {r['description']}; {r['layers']} layers, {r['params']} parameters; "
              f"{r['licence']}\n    {r['provenance']}\n    {state}")
    print("Any other --model is a path: a Hugging Face checkpoint folder (safetensors) or a .gguf file.")
    return 0


# trained cheap paths for a frozen base model
TRAIN_KINDS = {"translators": translators.main, "draft-head": draft.main, "layer-heal": heal.main,
               "router": router.main}


def cmd_train(args: argparse.Namespace) -> int:
    """``ponder train <kind> ...`` trains an adapter for a base model; ``ponder train --config ...`` a model."""
    if args.rest and args.rest[0] in TRAIN_KINDS:
        return TRAIN_KINDS[args.rest[0]](args.rest[1:])
    if args.rest and not args.rest[0].startswith("-"):
        raise PonderError(f"unknown training kind {args.rest[0]!r}; choose one of: {', '.join(TRAIN_KINDS)} "
                          "(or --config FILE to train a model)")
    return train_main(args.rest)


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "build":
        m = build_all(Path(args.out))
        print(json.dumps({k: m[k] for k in ("sha256", "bytes", "documents") if k in m}))
    elif args.action == "eval":
        build_eval(Path(args.out))
    elif args.action == "instruct":
        print(write_instruct(repo_data("code.txt"), repo_data("prose.txt"), args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ponder", description="Token-adaptive inference: per-token compute policies, "
                                                             "measured honestly against the dense model.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text with a policy")
    _add_model_args(g)
    g.add_argument("--prompt", default=None, help="plain text continued by the model")
    g.add_argument("--chat", default=None, help="one user message, rendered with the model's chat template")
    g.add_argument("--chat-file", default=None,
                   help='a JSON list of {"role": ..., "content": ...} turns, rendered with the chat template')
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(fn=cmd_generate)
    e = sub.add_parser("eval", help="perplexity and bits/byte of a text file")
    _add_model_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--window", type=int, default=None, help="tokens of context per window (default: model context)")
    e.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window/2)")
    e.set_defaults(fn=cmd_eval)
    m = sub.add_parser("models", help="the models ponder can open by name, with size, layers, provenance, licence")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_models)
    p = sub.add_parser("policies", help="list the registered policies and their flags")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policies)
    t = sub.add_parser("train", help="train an adapter for a base model (`ponder train translators`) or a model "
                                     "with ponder's recipe (`ponder train --config FILE`)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("train-router", help="train a skip router under a budget (= `ponder train router`)",
                       add_help=False)
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(fn=lambda a: router.main(a.rest))
    d = sub.add_parser("data", help="build the training corpus, the evaluation files, or the instruction prompts")
    d.add_argument("action", choices=["build", "eval", "instruct"])
    d.add_argument("--out", required=True)
    d.set_defaults(fn=cmd_data)
    bench_cli.add_subcommand(sub)  # bench, report
    embed_cli.add_subcommand(sub)  # embed
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PonderError as e:
        print(f"ponder: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ponder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
