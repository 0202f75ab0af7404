"""kvpress, the peer: its presses on a transformers model loading the same GGUF, on the inputs ponder's long-context
bench wrote (the same token ids, the same kept fractions).

This file runs in kvpress's own environment (``scripts/setup_kvpress.sh`` makes ``.venv-kvpress``: kvpress 0.5.5
needs transformers < 5.3), so it imports nothing from ponder; ``ponder.eval.longctx`` calls it as

    .venv-kvpress/bin/python kvpress_peer.py JOB.json OUT.jsonl

JOB holds the GGUF path, the thread count, the presses, the kept fractions, the quality windows (context ids,
continuation ids), the retrieval probes (context ids, question ids, answer) and the timing prompts: each prefilled
under every press (and none), then decode steps timed round-robin across them in this one process (its own dense
is the pairing for its ratios, as ponder's is for its own). A fresh process per configuration measures peak memory:

    .venv-kvpress/bin/python kvpress_peer.py --memory GGUF IDS.json PRESS KEPT DECODE THREADS

One JSON line per (press, fraction, section, group) is appended to OUT as it finishes, and a rerun skips the lines
already there. The protocol is the one ponder runs: the context is prefilled with the press active (kvpress
compresses only at prefill), then the continuation is scored, or the question is fed and the answer decoded
greedily, on the compressed cache.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import kvpress
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache


def press_for(name: str, kept: float):
    ratio = 1.0 - kept  # kvpress's knob: the fraction removed
    cls = {"streaming": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress, "tova": kvpress.TOVAPress,
           "knorm": kvpress.KnormPress, "random": kvpress.RandomPress,
           "expected_attention": kvpress.ExpectedAttentionPress,
           "observed_attention": kvpress.ObservedAttentionPress}[name]
    return cls(compression_ratio=ratio)


def load(gguf: str, eager: bool):
    p = Path(gguf)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                attn_implementation="eager" if eager else "sdpa").eval()


def continuation_nll(model, press, ctx: list[int], cont: list[int]) -> tuple[float, float]:
    """Summed NLL (nats) of ``cont`` after ``ctx`` prefilled under ``press``, and the seconds it took."""
    t0 = time.perf_counter()
    cache = DynamicCache()
    x = torch.tensor([ctx])
    with torch.inference_mode():
        if press is None:
            last = model(input_ids=x, past_key_values=cache).logits[0, -1]
        else:
            with press(model):
                last = model(input_ids=x, past_key_values=cache).logits[0, -1]
        y = torch.tensor([cont])
        # positions continue the uncompressed context (as kvpress's pipeline passes them): the cache's own length
        # is the compressed one
        pos = torch.arange(len(ctx), len(ctx) + len(cont))[None]
        lg = model(input_ids=y, past_key_values=cache, position_ids=pos).logits[0]
    lp = torch.cat([last[None], lg[:-1]]).float().log_softmax(-1)
    nll = -float(lp.gather(1, y[0][:, None]).sum())
    return nll, time.perf_counter() - t0


def answer(model, press, ctx: list[int], question: list[int], max_new: int) -> list[int]:
    cache = DynamicCache()
    with torch.inference_mode():
        x = torch.tensor([ctx])
        if press is None:
            lg = model(input_ids=x, past_key_values=cache).logits[0, -1]
        else:
            with press(model):
                lg = model(input_ids=x, past_key_values=cache).logits[0, -1]
        n = len(ctx)  # positions continue the uncompressed context, as kvpress's pipeline passes them
        if question:  # asked after the compressed context (else it was the prompt's end)
            pos = torch.arange(n, n + len(question))[None]
            lg = model(input_ids=torch.tensor([question]), past_key_values=cache, position_ids=pos).logits[0, -1]
            n += len(question)
        out = []
        for _ in range(max_new):
            t = int(lg.argmax())
            out.append(t)
            lg = model(input_ids=torch.tensor([[t]]), past_key_values=cache,
                       position_ids=torch.tensor([[n]])).logits[0, -1]
            n += 1
    return out


def prefill(model, press, ids: list[int]) -> tuple[DynamicCache, float]:
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if press is None:
            model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
        else:
            with press(model):
                model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
    return cache, time.perf_counter() - t0


def decode(model, cache: DynamicCache, tok: int, first: int, n: int) -> float:
    """``n`` greedy-shaped decode steps (the same token fed, positions continuing the uncompressed prompt), seconds
    per step."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for j in range(n):
            model(input_ids=torch.tensor([[tok]]), past_key_values=cache, position_ids=torch.tensor([[first + j]]))
    return (time.perf_counter() - t0) / n


def kv_held(cache: DynamicCache) -> tuple[int, int]:
    """Bytes of K/V the cache holds, and its token count."""
    n = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return n, cache.get_seq_length()


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def run_timing(model, job: dict, out: Path, done: set) -> None:
    t = job.get("timing")
    if not t:
        return
    for group, prompt in t["prompts"].items():
        todo = [p for p in t["presses"] if (p, 1.0 if p == "none" else t["kept"], "timing", group) not in done]
        if not todo:
            continue
        names = ["none", *[p for p in todo if p != "none"]]  # its own dense, for the paired ratios
        caches, floor, pre = {}, {}, {}
        for name in names:
            caches[name], pre[name] = prefill(model, None if name == "none" else press_for(name, t["kept"]), prompt)
            floor[name] = caches[name].get_seq_length()
        samples: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(t["repeats"] + 1):  # the first round warms up
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                caches[name].crop(floor[name])
                s = decode(model, caches[name], prompt[-1], len(prompt), t["decode_tokens"])
                if rep:
                    samples[name].append(s)
        for name in names:
            if (name, 1.0 if name == "none" else t["kept"], "timing", group) in done:
                continue
            caches[name].crop(floor[name])
            nb, nt = kv_held(caches[name])
            ratios = [a / b for a, b in zip(samples["none"], samples[name])]
            row = {"press": name, "kept": 1.0 if name == "none" else t["kept"], "section": "timing", "group": group,
                   "prompt_tokens": len(prompt), "prefill_s": pre[name], "decode_s_per_token": summary(samples[name]),
                   "decode_speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
                   "kv_bytes": nb, "kv_tokens": nt}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del caches


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(argv: list[str]) -> int:
    """One configuration in this fresh process: load, prefill, decode; peak RSS and the KV bytes held."""
    gguf, ids_path, name, kept, n, threads = argv
    torch.set_num_threads(int(threads))
    transformers.utils.logging.set_verbosity_error()
    model = load(gguf, False)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = json.loads(Path(ids_path).read_text())
    # the peak from here on (Linux clear_refs 5): loading the GGUF through transformers peaks above any cache
    try:
        Path("/proc/self/clear_refs").write_text("5")
        since = "load"
    except OSError:
        since = "start"
    cache, _ = prefill(model, None if name == "none" else press_for(name, float(kept)), ids)
    decode(model, cache, ids[-1], len(ids), int(n))
    nb, nt = kv_held(cache)
    print(json.dumps({"peak_rss": vm_hwm(), "rss_after_load": loaded, "peak_since": since, "kv_bytes": nb,
                      "kv_tokens": nt}))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--memory":
        return memory(argv[1:])
    job = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["press"], r["kept"], r["section"], r["group"]))
    torch.set_num_threads(int(job.get("threads", 2)))
    transformers.utils.logging.set_verbosity_error()
    models: dict[bool, object] = {}
    for name in job["presses"]:
        eager = name == "observed_attention"  # it reads the attention weights, which only eager returns
        if eager not in models:
            models = {eager: load(job["gguf"], eager)}  # one model at a time: memory
        model = models[eager]
        for kept in ([1.0] if name == "none" else job["kept"]):
            press = None if name == "none" else press_for(name, kept)
            for group, g in job["quality"].items():
                if (name, kept, "quality", group) in done:
                    continue
                nlls, secs = [], []
                for w in g["windows"]:
                    nll, s = continuation_nll(model, press, w["context"], w["cont"])
                    nlls.append(nll)
                    secs.append(s)
                row = {"press": name, "kept": kept, "section": "quality", "group": group,
                       "press_class": type(press).__name__ if press is not None else None,
                       "nll": nlls, "seconds": secs}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            for group, g in job.get("retrieval", {}).items():
                if (name, kept, "retrieval", group) in done or name not in job.get("probe_presses", [name]):
                    continue
                got = [answer(model, press, p["context"], p["question"], p["max_new"]) for p in g["probes"]]
                row = {"press": name, "kept": kept, "section": "retrieval", "group": group, "answers": got}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    if job.get("timing"):
        models = {}
        run_timing(load(job["gguf"], False), job, out, done)
    meta = {"kvpress": getattr(kvpress, "__version__", "0.5.5"), "transformers": transformers.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out.parent / (out.stem + ".meta.json")).write_text(json.dumps(meta) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
