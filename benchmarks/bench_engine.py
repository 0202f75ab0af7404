"""Engine speed: ponder's dense path against transformers on the same weights, and plan-level layer skipping.

Not a test: timings live here. Everything runs in one process on one set of weights, interleaved (A/B/A/B), after
warm-up; medians with min/max; the machine is recorded. Default: a 35.7M-parameter Llama config (8 layers, d=512,
FFN 1536, vocab 8192, untied), float32.

    .venv/bin/python benchmarks/bench_engine.py [--threads 2] [--repeats 7] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: int, dev: torch.device) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(dev)
            t = time.perf_counter()
            f()
            sync(dev)
            samples[k].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in samples.items()}


def bandwidth(dev: torch.device) -> float:
    """Streaming read bandwidth (bytes/s): sum over a buffer far larger than the caches."""
    x = torch.ones(512 * 2**20 // 4, device=dev)  # 512 MiB
    x.sum()
    ts = []
    for _ in range(5):
        sync(dev)
        t = time.perf_counter()
        x.sum()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf

    import ponder.api as api
    from ponder.engine import LayerPlan, SamplingConfig, generate
    from ponder.policies import StaticPlanner

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    hf = tf.LlamaForCausalLM(cfg).eval()
    folder = Path(tempfile.mkdtemp())
    hf.save_pretrained(folder)
    hf = hf.to(dev, dtype)
    eng = api.load(folder, dtype=args.dtype, device=args.device)
    n_params = sum(p.numel() for p in hf.parameters())
    N = args.new_tokens
    prompt = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(1)).tolist()[0]
    sc = SamplingConfig(max_new_tokens=N)
    # Half the layers, spread through the stack, first and last kept (e.g. 8 layers: skip 1, 3, 5, 6).
    L = args.layers
    skip_set = set(sorted({round(1 + k * (L - 2) / (L // 2)) for k in range(L // 2)} | {L - 2})[: L // 2])
    half = StaticPlanner([LayerPlan.skip(dev) if i in skip_set else None for i in range(L)])

    def hf_gen(b):
        ids = torch.tensor([prompt] * b, device=dev)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                        do_sample=False, pad_token_id=0)

    def ponder_gen(b, planner=None):
        generate(eng, [prompt] * b, sc, (lambda: planner) if planner else None)

    # decode: time whole generate calls; prefill of the 32-token prompt is small and the same for both sides
    res = {}
    res["decode_b1"] = interleaved({"ponder": lambda: ponder_gen(1), "transformers": lambda: hf_gen(1),
                                    "ponder_half_layers": lambda: ponder_gen(1, half)}, args.repeats, args.warmup, dev)
    res["decode_b8"] = interleaved({"ponder": lambda: ponder_gen(8), "transformers": lambda: hf_gen(8),
                                    "ponder_half_layers": lambda: ponder_gen(8, half)}, args.repeats, args.warmup, dev)
    x512 = torch.randint(0, 8192, (1, 512), device=dev)

    def hf_fwd():  # prefill as generation does it: logits for the last position only, on both sides
        with torch.inference_mode():
            hf(x512, logits_to_keep=1)

    res["prefill_512"] = interleaved({"ponder": lambda: eng.forward(x512, logits="last"), "transformers": hf_fwd,
                                      "ponder_half_layers": lambda: eng.forward(x512, planner=half, logits="last")},
                                     args.repeats, args.warmup, dev)
    bw = bandwidth(dev)
    weight_bytes = (n_params - cfg.vocab_size * cfg.hidden_size) * torch.tensor([], dtype=dtype).element_size()
    bound_ms = weight_bytes / bw * 1e3
    out = {"machine": machine(), "dtype": args.dtype, "device": args.device, "params": n_params,
           "config": {"layers": args.layers, "hidden": args.hidden, "ffn": 3 * args.hidden, "vocab": 8192},
           "new_tokens": N, "bandwidth_GBps": round(bw / 1e9, 2),
           "weight_stream_bound_ms_per_token": round(bound_ms, 3),
           "layers_skipped_in_half": sorted(skip_set), "results": res}
    print(json.dumps(out["machine"]), f"params={n_params/1e6:.1f}M dtype={args.dtype}")
    print(f"memory bandwidth {bw/1e9:.1f} GB/s -> weight-streaming bound {bound_ms:.2f} ms/token")
    for k, r in res.items():
        per = N if k.startswith("decode") else 1
        unit = "ms/token" if per > 1 else "ms"
        row = " | ".join(f"{n}: {v['median']/per*1e3:.2f} [{v['min']/per*1e3:.2f}-{v['max']/per*1e3:.2f}]"
                         for n, v in r.items())
        print(f"{k:<12} {unit:<9} {row}")
        print(f"{'':<22} ponder vs transformers {r['transformers']['median']/r['ponder']['median']:.2f}x, "
              f"half layers vs dense {r['ponder']['median']/r['ponder_half_layers']['median']:.2f}x")
    d1 = res["decode_b1"]["ponder"]["median"] / N * 1e3
    print(f"decode b1: {d1:.2f} ms/token = {d1/bound_ms:.2f}x the bound (includes the 32-token prefill)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
