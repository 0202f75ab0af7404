"""How far a policy's outputs move from the dense model's, token by token.

Perplexity averages; these do not. KL(dense || policy) and top-1 agreement compare full next-token distributions
on the same windows; greedy exact match says whether a user would see different text at all (and the mean position
of the first divergence, how soon); probe exact match asks for specific facts and names that perplexity can hide.

The dense side of every comparison is computed once (``DenseReference``) and reused for each policy of a sweep.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.forward import Engine
from ..engine.generate import SamplingConfig, generate
from ..engine.stats import Stats
from ..errors import PonderError


def new_stats(engine: Engine, record_tokens: bool = False) -> Stats:
    return engine.new_stats(record_tokens=record_tokens)


def _planner(policy: Any, engine: Engine):
    return policy.planner(engine) if policy is not None else None


# ---- logits: KL and top-1 agreement ------------------------------------------------------------------------------

def cut_windows(ids: list[int], window: int, n_tokens: int) -> list[list[int]]:
    """Non-overlapping windows covering the first ``n_tokens`` of ``ids`` (the last one may be shorter)."""
    ids = ids[:n_tokens]
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


@dataclass
class LogitReference:
    windows: list[list[int]]
    logprobs: list[torch.Tensor]  # per window (T, V) float32 dense log-probabilities

    @classmethod
    def build(cls, engine: Engine, windows: list[list[int]]) -> LogitReference:
        lps = []
        for w in windows:
            ids = torch.tensor([w], device=engine.device)
            lg = engine.forward(ids, None, None, None, logits="all", phase="score").logits[0].float()
            lps.append(torch.log_softmax(lg, -1).cpu())
        return cls(windows, lps)


def logit_agreement(engine: Engine, policy: Any, ref: LogitReference) -> dict[str, Any]:
    """Mean per-token KL(dense || policy) in nats, top-1 agreement, and each window's executed FLOP fraction.

    Windows run one at a time (batch 1) with their own counters, so the spread of the realised budget across
    sequences is measured, not assumed.
    """
    kl_sum, agree, n = 0.0, 0, 0
    fracs: list[float] = []
    for w, lp_d in zip(ref.windows, ref.logprobs):
        st = new_stats(engine)
        ids = torch.tensor([w], device=engine.device)
        lg = engine.forward(ids, None, _planner(policy, engine), st, logits="all", phase="score").logits[0].float()
        lp_p = torch.log_softmax(lg, -1).cpu()
        kl_sum += float((lp_d.exp() * (lp_d - lp_p)).sum(-1).double().sum())
        agree += int((lp_d.argmax(-1) == lp_p.argmax(-1)).sum())
        n += lp_d.shape[0]
        fracs.append(st.flops_fraction)
    return {"kl": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1), "kl_tokens": n,
            "window_flops_fractions": fracs}


# ---- greedy generation: exact match and first divergence -------------------------------------------------------

def cut_prompts(ids: list[int], n: int, length: int, skip: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens at evenly spaced offsets of ``ids`` (after the first ``skip`` tokens)."""
    usable = len(ids) - skip - length
    if n <= 0:
        return []
    if usable <= 0:
        raise PonderError(f"the data has {len(ids)} tokens: too short to cut {n} prompts of {length} tokens")
    step = max(1, usable // n)
    return [ids[skip + i * step: skip + i * step + length] for i in range(n)]


@dataclass
class GreedyRun:
    tokens: list[list[int]]
    flops_fractions: list[float]
    weight_bytes_fractions: list[float]
    layers: list[list[int]] = field(default_factory=list)  # per prompt: layers used by each input token
    extra: dict[str, Any] = field(default_factory=dict)


def greedy(engine: Engine, policy: Any, prompts: list[list[int]], new_tokens: int) -> GreedyRun:
    """Greedy continuations, one prompt at a time, with per-prompt counters and per-token depth."""
    sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_tokens=())
    run = GreedyRun([], [], [])
    extras: list[dict] = []
    for p in prompts:
        st = new_stats(engine, record_tokens=True)
        if policy is None:
            res = generate(engine, [p], sc, None, st)
        else:
            res = policy.generate(engine, [p], sc, st)
        run.tokens.append(list(res.tokens[0]))
        run.flops_fractions.append(st.flops_fraction)
        run.weight_bytes_fractions.append(st.weight_bytes_fraction)
        per_tok = res.extra.get("layers_per_token") if isinstance(res.extra, dict) else None
        if per_tok is None:
            per_tok = [int(x) for m in st.layers_used() for x in m[0].tolist()]
        run.layers.append([int(x) for x in per_tok])
        extras.append({k: v for k, v in (res.extra or {}).items() if _jsonable_scalar(v)})
    run.extra = _mean_extras(extras)
    return run


def _jsonable_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and not (isinstance(v, float) and not math.isfinite(v))


def _mean_extras(extras: list[dict]) -> dict[str, Any]:
    keys = {k for e in extras for k in e}
    out = {}
    for k in sorted(keys):
        vals = [float(e[k]) for e in extras if k in e]
        out[k] = statistics.fmean(vals) if vals else None
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def exact_match(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Share of prompts whose continuation equals dense, and the mean index of the first differing token."""
    if not ref:
        return {"greedy_exact_match": None, "first_divergence": None}
    same, firsts = 0, []
    for a, b in zip(ref, got):
        same += a == b
        d = first_divergence(a, b)
        firsts.append(min(len(a), len(b)) if d is None else d)  # identical: its length (a prefix gives that too)
    return {"greedy_exact_match": same / len(ref), "first_divergence": statistics.fmean(firsts),
            "greedy_new_tokens": max(len(a) for a in ref)}


# ---- probes ------------------------------------------------------------------------------------------------------

def load_probes(path: str | Path, n: int | None = None) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise PonderError(f"probe file {p} not found")
    out = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PonderError(f"{p}:{i + 1} is not valid JSON ({e.msg})") from None
    if not out:
        raise PonderError(f"probe file {p} is empty")
    return out[:n] if n is not None else out


def probe_accuracy(engine: Engine, policy: Any, probes: list[dict[str, Any]], new_tokens: int = 16,
                   batch: int = 8) -> dict[str, Any]:
    """Exact-match accuracy by the rule in data/eval/README.md: greedy from the prompt (no special tokens), the
    first len(answer) characters of the detokenised continuation must equal the answer.

    Prompts longer than the model's context minus ``new_tokens`` keep their last tokens (the text nearest the
    answer); how many were cut is reported. Probes run in batches of ``batch`` for batch-compatible policies
    (whose flag promises batching changes nothing) and one at a time otherwise.
    """
    tok = engine.tokenizer
    if tok is None:
        raise PonderError("probe scoring needs the model's tokenizer")
    room = engine.cfg.max_position_embeddings - new_tokens
    enc = tok.encode_batch([p["prompt"] for p in probes])
    cut = sum(len(e) > room for e in enc)
    enc = [e[-room:] for e in enc]
    bs = batch if (policy is None or getattr(policy, "batch_compatible", False)) else 1
    order = sorted(range(len(probes)), key=lambda i: len(enc[i]))
    sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_tokens=())
    correct = [False] * len(probes)
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        prompts = [enc[i] for i in idx]
        res = (generate(engine, prompts, sc) if policy is None else policy.generate(engine, prompts, sc, None))
        for i, toks in zip(idx, res.tokens):
            ans = probes[i]["answer"]
            correct[i] = tok.decode(toks)[:len(ans)] == ans
    kinds: dict[str, list[bool]] = {}
    for p, c in zip(probes, correct):
        kinds.setdefault(p.get("kind", "all"), []).append(c)
    return {"probe_exact_match": sum(correct) / len(correct), "probes": len(correct), "probes_truncated": cut,
            "probe_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "probe_correct": correct}
