"""Peers the bench runs beside ponder on the same inputs: llama.cpp (llama-cpp-python) and transformers.

Why here and not in the bench loop: each peer is an optional extra with its own loading quirks, and a missing one
must be reported, never faked. Each wrapper takes token ids (the same ids ponder runs) and returns token ids, so
the comparison never depends on two tokenizers agreeing.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..engine.generate import SamplingConfig, generate
from ..errors import PonderError
from ..models.gguf import write_gguf
from . import timing
from .quality import first_divergence

PEER = "transformers-generate"
LLAMACPP_F32, LLAMACPP_FILE = "llama.cpp-f32", "llama.cpp-file"  # same weights as ponder; the original GGUF
LLAMACPP_HINT = "bash scripts/setup-peers.sh (builds llama-cpp-python from its sdist; pip install '.[peers]')"


def llamacpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


class LlamaCpp:
    """One llama.cpp context on a GGUF file, greedy, batch 1, with ponder's thread count."""

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None, logits_all: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise PonderError(f"llama.cpp is not installed; {LLAMACPP_HINT}") from None
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.threads,
                         n_threads_batch=self.threads, verbose=False, logits_all=logits_all)

    def generate(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``, from an empty cache every call (the prompt is prefilled each time,
        as ponder's generate does)."""
        self.llm.reset()
        out: list[int] = []
        for t in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) >= n:
                break
        return out

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def decode_step_s(self, ids: list[int], n: int) -> float:
        """Seconds per decode step of the greedy loop after its prefill (the split ponder's generate reports)."""
        self.llm.reset()
        t0, got = 0.0, 0
        for _ in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            got += 1
            if got == 1:
                t0 = time.perf_counter()
            if got >= n:
                break
        return (time.perf_counter() - t0) / (n - 1)

    def extend(self, ids: list[int], keep: int) -> None:
        """Forward ``ids`` on a cache cut back to ``keep`` tokens (a speculative verification step)."""
        self.llm.n_tokens = keep
        self.llm.eval(ids)


def f32_gguf_for(engine: Any, cache_dir: str | Path | None = None) -> Path:
    """An F32 GGUF of exactly the weights ``engine`` runs: llama.cpp's same-weights peer file, written once and kept
    under a name keyed by the source file's name and size and the engine's dtype. Needs the engine to come from a
    GGUF (its tokenizer metadata is copied)."""
    info = getattr(engine, "gguf", None)
    if info is None:
        raise PonderError("the llama.cpp same-weights peer needs a model opened from a GGUF file")
    h = hashlib.sha256()
    h.update(str(info.path.stat().st_size).encode())
    h.update(info.path.name.encode())
    h.update(str(engine.dtype).encode())
    d = Path(cache_dir or os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder")) / "gguf"
    out = d / f"{info.path.stem}-{h.hexdigest()[:12]}.F32.gguf"
    if not out.is_file():
        write_gguf(out, engine.model.state_dict(), engine.cfg, info.fields)
    return out


# ---- bench rows --------------------------------------------------------------------------------------------------
PEER_FLAGS = dict(real=True, kv_compatible=True, batch_compatible=True, training_free=True, lossless=True)


def _not_run(bench: Any, name: str, why: str) -> dict[str, Any]:
    row = bench.base_row(name, 1.0)
    row.update(PEER_FLAGS, timing_notes=[why], env=bench.env, status="not-run")
    return row


def _timed_pair(bench: Any, theirs: Any, bar, label: str) -> dict[str, Any]:
    """Interleave ponder's dense generate with a peer's, at 1 and n new tokens on the same prompt ids; decode cost per
    token is the difference over n - 1 (prefill cancels). ``theirs(k)`` returns a callable making k tokens."""
    e, s = bench.engine, bench.settings
    p = bench.decode_prompts[0]
    n = s.timing_tokens

    def pd_gen(k: int):
        sc = SamplingConfig(max_new_tokens=k, temperature=0.0, stop_tokens=())
        return lambda: generate(e, [p], sc)

    bench._say(bar, f"{label}: timing")
    t = timing.interleaved({"ponder_1": pd_gen(1), "peer_1": theirs(1), "ponder_n": pd_gen(n), "peer_n": theirs(n)},
                           warmup=s.warmup, repeats=s.repeats, device=e.device, min_seconds=s.min_timed_s,
                           max_repeats=max(s.repeats, 25))
    per = {k: (t[f"{k}_n"]["median"] - t[f"{k}_1"]["median"]) / max(1, n - 1) for k in ("ponder", "peer")}
    return {
        "timings": {"generate_1": {"dense": t["ponder_1"], "policy": t["peer_1"]},
                    f"generate_{n}": {"dense": t["ponder_n"], "policy": t["peer_n"]}},
        "prefill_ms": 1e3 * t["peer_1"]["median"], "prefill_ms_dense": 1e3 * t["ponder_1"]["median"],
        "prefill_speedup": t["ponder_1"]["median"] / t["peer_1"]["median"],
        "decode_ms_per_token": 1e3 * per["peer"], "decode_ms_per_token_dense": 1e3 * per["ponder"],
        "tokens_per_s": 1.0 / per["peer"] if per["peer"] > 0 else None,
        "decode_speedup": per["ponder"] / per["peer"] if per["peer"] > 0 else None,
        "generate_speedup": t["ponder_n"]["median"] / t["peer_n"]["median"],
        "speedup_meaning": "ponder dense time / peer time: below 1 means ponder's dense path is faster",
    }


def _greedy_compare(bench: Any, theirs_tokens) -> dict[str, Any]:
    """Greedy tokens of the peer against ponder dense on every greedy prompt of the bench."""
    ref = bench.ref().greedy.tokens
    n = bench.settings.new_tokens
    same, firsts = 0, []
    for p, mine in zip(bench.prompts, ref):
        theirs = theirs_tokens(p, n)
        d = first_divergence(list(mine), theirs)
        same += d is None
        firsts.append(d)
    return {"greedy_exact_match": same / max(1, len(ref)), "greedy_first_divergence": firsts,
            "greedy_prompts": len(ref)}


def transformers_row(bench: Any, bar=None) -> dict[str, Any]:
    """transformers' ``generate`` on the same checkpoint (a GGUF through its own GGUF loader)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return _not_run(bench, PEER, "transformers is not installed: pip install 'ponder[hf]' to time it as a peer")
    e = bench.engine
    path = getattr(e, "path", None)
    if path is None:
        return _not_run(bench, PEER, "the engine has no checkpoint folder or file to load into transformers")
    bench._say(bar, "transformers generate: loading")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = Path(path)
    try:
        hf = (AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=e.dtype) if p.is_file()
              else AutoModelForCausalLM.from_pretrained(str(p), dtype=e.dtype)).to(e.device).eval()
    except ImportError as err:  # its GGUF loader needs the gguf package (and accelerate)
        return _not_run(bench, PEER, f"transformers cannot load this model here ({err})")
    row = bench.base_row(PEER, 1.0)
    row.update(PEER_FLAGS)
    row["peer"] = {"library": "transformers", "version": transformers.__version__, "class": type(hf).__name__,
                   "attn_implementation": getattr(hf.config, "_attn_implementation", None),
                   "weights": "float32 (its own GGUF dequantisation)" if p.is_file() else str(e.dtype)}

    def hf_gen(k: int, ids: list[int] | None = None):
        x = torch.tensor([ids if ids is not None else bench.decode_prompts[0]], device=e.device)

        def run():
            with torch.inference_mode():  # an explicit mask: a pad id may also be a real token of the prompt
                return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        return run

    row.update(_timed_pair(bench, hf_gen, bar, "transformers generate"))
    row.update(_greedy_compare(bench, lambda ids, n: hf_gen(n, ids)()[0, len(ids):].tolist()))
    row["env"] = bench.env
    return row


def llamacpp_row(bench: Any, which: str, bar=None) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python, batch 1, greedy, ponder's thread count) on ``which``: "f32", an F32 GGUF of the
    very weights ponder runs (its greedy tokens must equal ponder's), or "file", the original GGUF (what a user runs
    today; quantised, so its tokens may differ: the row says by how much)."""
    name = LLAMACPP_F32 if which == "f32" else LLAMACPP_FILE
    ver = llamacpp_version()
    if ver is None:
        return _not_run(bench, name, f"llama.cpp is not installed; to add this row: {LLAMACPP_HINT}")
    e = bench.engine
    bench._say(bar, f"{name}: loading")
    path = f32_gguf_for(e) if which == "f32" else e.gguf.path
    s = bench.settings
    n_ctx = max(len(p) for p in bench.prompts + bench.decode_prompts[:1]) + max(s.new_tokens, s.timing_tokens) + 8
    lc = LlamaCpp(path, n_ctx=max(256, n_ctx))
    row = bench.base_row(name, 1.0)
    row.update(PEER_FLAGS)
    row["peer"] = {"library": "llama-cpp-python", "version": ver, "file": path.name,
                   "weights": "F32 (written by ponder from the weights it runs)" if which == "f32"
                   else f"{e.gguf.file_type} (the original file)", "threads": lc.threads}

    def lc_gen(k: int):
        p = bench.decode_prompts[0]
        return lambda: lc.generate(p, k)

    row.update(_timed_pair(bench, lc_gen, bar, name))
    row.update(_greedy_compare(bench, lc.generate))
    row["env"] = bench.env
    return row
