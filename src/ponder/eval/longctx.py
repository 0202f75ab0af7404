"""The long-context bench: KV-selection policies judged on long held-out windows, side by side with kvpress.

    ponder bench-long [--profile quick|full] [--model smollm2] [--weights float32] [--no-kvpress]

Four sections, each written to ``results.jsonl`` as it finishes (a rerun skips what is there):

- **quality**: windows of the held-out code and prose, a context of C tokens then 64 continuation tokens. The
  context is prefilled with the policy cutting the cache to the kept fraction, then the continuation is scored on
  the cut cache (teacher-forced): bits per byte of the continuation beside dense. One dense prefill serves every
  policy (``FanOut``): a cut at prefill does not change the prefill's own states, only what later tokens read, so
  each policy's cut is taken from the same pass and its cache kept apart (a test holds this equal to running each
  policy alone).
- **retrieval**: facts placed at several depths of a long held-out context (one key, several keys with
  distractors, a two-hop chain, as RULER varies them), the context cut, then the question asked and the answer
  decoded greedily on the cut cache (question-agnostic, as kvpress's pipeline compresses a context).
- **timing**: one prompt per length; each configuration prefilled once (its time recorded), then decode steps timed
  interleaved with dense in one process (medians, min/max, paired ratios), and the KV bytes the cache really holds.
- **memory**: peak resident memory of a fresh process per configuration (load, prefill, decode), beside the KV
  bytes it held: the freed bytes measured, not computed.

kvpress runs its presses in its own environment (``scripts/setup_kvpress.sh``) on the same GGUF through
transformers, on the same token ids and fractions (``kvpress_peer.py``).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..engine.cache import ShrinkingCache
from ..engine.forward import Engine, PlannerBase, StepContext
from ..errors import PonderError
from ..policies import kv
from .envinfo import environment, git_commit, rss_peak_bytes, rss_peak_reset
from .points import repo_data
from .timing import interleaved, paired_ratio

CONT = 64
NAMES = ("Anna", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaveh", "Lena")


@dataclass
class LongProfile:
    quality_lengths: tuple[int, ...] = (1536, 4096)
    windows: int = 6  # per text and length
    kept: tuple[float, ...] = (0.5, 0.25)
    policies: tuple[str, ...] = ("streaming", "snapkv", "tova", "h2o", "knorm", "kv-random", "lazyllm",
                                 "tokenselect", "mikv", "razor")
    prefill_lengths: tuple[int, ...] = (4096,)
    prefill_policies: tuple[str, ...] = ("lazyllm",)
    prefill_repeats: int = 3
    probe_lengths: tuple[int, ...] = (2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    variants: tuple[str, ...] = ("single", "multikey", "twohop", "single+q", "multikey+q")
    timing_lengths: tuple[int, ...] = (4096, 8192)
    timing_policies: tuple[str, ...] = ("streaming", "snapkv", "tova", "h2o", "mikv", "razor")
    timing_kept: float = 0.5
    decode_tokens: int = 32
    repeats: int = 5
    memory: bool = True
    memory_repeats: int = 2
    # the evicting cutters hold the same bytes (snapkv stands for them); mikv and razor hold their own
    memory_policies: tuple[str, ...] = ("streaming", "snapkv", "mikv", "razor")
    kvpress_presses: tuple[str, ...] = ("none", "streaming", "snapkv", "tova", "knorm", "random",
                                        "expected_attention", "observed_attention")
    kvpress_probe_presses: tuple[str, ...] = ("none", "streaming", "snapkv", "tova", "expected_attention")
    kvpress_variants: tuple[str, ...] = ("single", "multikey", "single+q", "multikey+q")
    kvpress_lengths: tuple[int, ...] = (1536,)
    kvpress_probe_lengths: tuple[int, ...] = (2048,)
    kvpress_timing_presses: tuple[str, ...] = ("none", "streaming", "snapkv", "expected_attention")
    kvpress_memory_presses: tuple[str, ...] = ("none", "snapkv")


PROFILES = {
    "quick": LongProfile(),
    "full": LongProfile(quality_lengths=(1536, 4096, 8000), windows=12, probe_lengths=(2048, 4096, 8000),
                        variants=("single", "multikey", "twohop", "single+q", "multikey+q", "twohop+q"),
                        kvpress_lengths=(1536, 4096), kvpress_probe_lengths=(2048, 4096)),
    # seconds, for tests and a first look: one short length of each section
    "smoke": LongProfile(quality_lengths=(96,), windows=2, probe_lengths=(110,), depths=(0.2, 0.8),
                         variants=("single", "multikey"), timing_lengths=(96,), timing_policies=("snapkv",),
                         prefill_lengths=(96,), prefill_repeats=2,
                         decode_tokens=4, repeats=2, memory=False, kvpress_presses=(), kvpress_lengths=(),
                         kvpress_probe_lengths=()),
}


# ---- one prefill, every policy's cut ----------------------------------------------------------------------------
class FanOut(PlannerBase):
    """A planner on a dense prefill that takes every policy's cut from it, each into its own cache; the pass's own
    cache stays dense. Sound because a cut made after layer i ran changes nothing the prefill computes: the policy
    would see exactly these states and keys had it run alone."""

    def __init__(self, engine: Engine, policies: dict[str, kv.KVPolicy]):
        self.planners = {k: p.planner(engine) for k, p in policies.items()}
        self.caches: dict[str, ShrinkingCache] = {}

    def evict(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> None:
        main = ctx.cache
        if i == 0:
            for key in self.planners:
                c = ShrinkingCache(ctx.engine.cfg, main.batch, main.max_len, ctx.engine.dtype, ctx.engine.device)
                c.length, c.pad, c.valid, c.padded = main.length, main.pad.clone(), main.valid.clone(), main.padded
                self.caches[key] = c
        for key, pl in self.planners.items():
            c = self.caches[key]
            cut = pl.evict(i, x_in, ctx) if pl is not None else None
            if cut is None:
                c.k[i], c.v[i] = main.k[i].clone(), main.v[i].clone()
            else:
                c.k[i], c.v[i] = main.k[i], main.v[i]  # read only: keep() gathers into new storage
                c.keep(i, *cut)
        return None

    def finish(self) -> dict[str, ShrinkingCache]:
        for c in self.caches.values():
            c.commit()
        return self.caches


def prefill_all(engine: Engine, ids: list[int], policies: dict[str, kv.KVPolicy], room: int
                ) -> tuple[torch.Tensor, dict[str, ShrinkingCache]]:
    """The context's last logits and one cut cache per policy (key ``"dense"`` too: nothing cut)."""
    main = ShrinkingCache(engine.cfg, 1, len(ids) + room, engine.dtype, engine.device)
    fan = FanOut(engine, policies)
    last = engine.forward(torch.tensor([ids], device=engine.device), main, fan, logits="last").logits[0]
    caches = fan.finish()
    caches["dense"] = main
    return last, caches


def _feed(engine: Engine, ids: list[int], cache: Any, planner: Any, logits: str) -> torch.Tensor:
    """Forward ``ids`` on ``cache``: in one step, or one token at a time through a planner that decides at one-token
    steps (``KVPolicy.decodes``); the logits of every fed token (B = 1)."""
    if planner is None:
        y = torch.tensor([ids], device=engine.device)
        return engine.forward(y, cache, None, logits=logits, phase="decode").logits[0]
    out = [engine.forward(torch.tensor([[t]], device=engine.device), cache, planner, logits="last",
                          phase="decode").logits[0] for t in ids]
    return torch.stack(out) if logits == "all" else out[-1]


def continuation_nll(engine: Engine, last: torch.Tensor, cache: Any, cont: list[int], planner: Any = None
                     ) -> float:
    """Summed NLL (nats) of ``cont`` scored teacher-forced on ``cache`` (the context's last logits predict its first
    token)."""
    lg = _feed(engine, cont, cache, planner, "all")
    y = torch.tensor(cont, device=engine.device)
    lp = torch.cat([last[None], lg[:-1]]).float().log_softmax(-1)
    return -float(lp.gather(1, y[:, None]).sum())


def greedy_answer(engine: Engine, cache: Any, question: list[int], max_new: int, planner: Any = None,
                  last: torch.Tensor | None = None) -> list[int]:
    """Greedy answer tokens after ``question`` is fed on ``cache``; with no question (it was part of the prompt),
    from the prompt's ``last`` logits."""
    lg = _feed(engine, question, cache, planner, "last") if question else last
    out = []
    for _ in range(max_new):
        t = int(lg.argmax())
        out.append(t)
        lg = engine.forward(torch.tensor([[t]], device=engine.device), cache, planner, logits="last",
                            phase="decode").logits[0]
    return out


def policy_set(prof: LongProfile) -> dict[str, kv.KVPolicy]:
    return {f"{n}@{k:g}": kv.get(n, k) for n in prof.policies for k in prof.kept}


# ---- inputs -------------------------------------------------------------------------------------------------
def quality_windows(ids: list[int], length: int, n: int) -> list[dict[str, list[int]]]:
    """``n`` windows of ``length`` context tokens and ``CONT`` continuation tokens, spread evenly over ``ids``."""
    span = length + CONT
    if len(ids) < span:
        raise PonderError(f"the held-out text has {len(ids)} tokens, fewer than one window of {span}")
    starts = [round(j * (len(ids) - span) / max(1, n - 1)) for j in range(n)] if n > 1 else [0]
    return [{"context": ids[s:s + length], "cont": ids[s + length:s + span]} for s in starts]


def probes(engine: Engine, prose: str, length: int, depths: tuple[float, ...], variant: str, seed: int = 0
           ) -> list[dict[str, Any]]:
    """Retrieval probes cut from held-out prose: facts inserted at sentence boundaries near each depth of a context
    of about ``length`` tokens, a question after it. ``single``: one code; ``multikey``: three people's codes, one
    asked for; ``twohop``: a code, and later a second person whose code is 'the same as' the first's."""
    tok = engine.tokenizer
    rng = random.Random(f"{seed}-{length}-{variant}")
    sents = [s.strip() + "." for s in prose.replace("\n", " ").split(". ") if len(s.strip()) > 20]
    out = []
    for d in depths:
        names = rng.sample(NAMES, 3)
        codes = [str(rng.randrange(10000, 100000)) for _ in names]
        if variant == "single":
            facts, at, who, ans = [f"The secret code of {names[0]} is {codes[0]}."], [d], names[0], codes[0]
        elif variant == "multikey":  # the asked fact at depth d, two distractors elsewhere
            facts = [f"The secret code of {n} is {c}." for n, c in zip(names, codes)]
            at, who, ans = [d, (d + 0.33) % 1, (d + 0.66) % 1], names[0], codes[0]
        elif variant == "twohop":  # the code at depth d, the link to it later
            facts = [f"The secret code of {names[0]} is {codes[0]}.",
                     f"The secret code of {names[1]} is the same as the secret code of {names[0]}."]
            at, who, ans = [d, d + (1 - d) / 2], names[1], codes[0]
        else:
            raise PonderError(f"unknown probe variant {variant!r}; choose single, multikey or twohop")
        question = f"\n\nQuestion: What is the secret code of {who}?\nAnswer: The secret code of {who} is"
        q_ids = tok.encode(question)
        budget = length - len(q_ids)
        start = rng.randrange(0, max(1, len(sents) // 2))
        hay: list[str] = []
        n_tok = 0
        j = start
        while n_tok < budget:
            s = sents[j % len(sents)]
            hay.append(s)
            n_tok += len(tok.encode(" " + s))
            j += 1
        while hay and n_tok > budget:  # trim to the budget after the facts are in
            n_tok -= len(tok.encode(" " + hay.pop()))
        fact_tok = sum(len(tok.encode(" " + f)) for f in facts)
        while hay and n_tok + fact_tok > budget:
            n_tok -= len(tok.encode(" " + hay.pop()))
        pieces = list(hay)
        for pos, f in sorted(zip((min(len(hay), round(a * len(hay))) for a in at), facts), key=lambda t: -t[0]):
            pieces.insert(pos, f)  # from the back, so earlier positions stay where they were
        ctx_ids = tok.encode(" ".join(pieces))
        out.append({"depth": d, "context": ctx_ids, "question": q_ids, "answer": ans, "max_new": 8})
    return out


def probe_set(engine: Engine, prose: str, length: int, depths: tuple[float, ...], variant: str
              ) -> list[dict[str, Any]]:
    """``probes`` for ``variant``; a ``+q`` variant (``single+q``) puts the question inside the prompt the policy
    cuts (question-aware, SnapKV's own setting) instead of after it (question-agnostic, kvpress's pipeline)."""
    base, aware = variant.removesuffix("+q"), variant.endswith("+q")
    ps = probes(engine, prose, length, depths, base)
    if aware:
        ps = [{**p, "context": p["context"] + p["question"], "question": []} for p in ps]
    return ps


def answered(engine: Engine, toks: list[int], ans: str) -> bool:
    return ans in engine.tokenizer.decode(toks).replace(",", "").split("\n")[0]


# ---- results --------------------------------------------------------------------------------------------------
class Results:
    """results.jsonl of a run folder: appended line by line, keyed so a rerun skips what is done."""

    def __init__(self, out: Path):
        self.path = out / "results.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            self.rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        self._keys = {self.key(r) for r in self.rows}

    @staticmethod
    def key(r: dict[str, Any]) -> tuple:
        return (r["section"], r.get("peer", "ponder"), r.get("group"), r.get("policy"), r.get("kept"))

    def have(self, **k: Any) -> bool:
        return self.key(k) in self._keys

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._keys.add(self.key(row))
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _split(key: str) -> tuple[str, float]:
    name, _, k = key.partition("@")
    return name, float(k) if k else 1.0


def _missing(res: Results, section: str, group: str, pols: dict[str, kv.KVPolicy]) -> dict[str, kv.KVPolicy]:
    return {k: p for k, p in pols.items() if not res.have(section=section, group=group, policy=_split(k)[0],
                                                          kept=_split(k)[1])}


def caches_for(engine: Engine, ids: list[int], pols: dict[str, kv.KVPolicy], room: int
               ) -> dict[str, tuple[torch.Tensor, Any, Any]]:
    """(context's last logits, cache, decode planner) per policy key and ``"dense"``: one shared pass for the
    policies that only cut, one pass each for those that change the prefill itself (``fan_out = False``); the
    planner of a policy that decides at one-token steps (``decodes``), else None."""
    shared = {k: p for k, p in pols.items() if p.fan_out}
    last, caches = prefill_all(engine, ids, shared, room)
    out: dict[str, tuple[torch.Tensor, Any, Any]] = {k: (last, c, None) for k, c in caches.items()}
    for k, p in pols.items():
        if not p.fan_out:
            c = engine.new_cache(1, len(ids) + room, shrinking=p.shrinks)
            lg = engine.forward(torch.tensor([ids], device=engine.device), c, p.planner(engine), logits="last")
            out[k] = (lg.logits[0], c, None)
        if p.decodes:
            out[k] = (*out[k][:2], p.planner(engine))
    return out


def run_quality(engine: Engine, prof: LongProfile, texts: dict[str, str], res: Results, say) -> None:
    for tname, text in texts.items():
        ids = engine.tokenizer.encode(text)
        for L in prof.quality_lengths:
            group = f"{tname}-{L}"
            pols = _missing(res, "quality", group, policy_set(prof))
            dense_done = res.have(section="quality", group=group, policy="dense", kept=1.0)
            if not pols and dense_done:
                continue
            wins = quality_windows(ids, L, prof.windows)
            nll: dict[str, list[float]] = {k: [] for k in ["dense", *pols]}
            kv_tokens: dict[str, int] = {}
            kv_bytes: dict[str, int] = {}
            t0 = time.perf_counter()
            for j, w in enumerate(wins):
                say(f"quality {group}: window {j + 1}/{len(wins)}")
                for k, (last, c, pl) in caches_for(engine, w["context"], pols, CONT).items():
                    kv_tokens[k], kv_bytes[k] = c.length, c.nbytes()
                    nll[k].append(continuation_nll(engine, last, c, w["cont"], pl))
            nbytes = sum(len(engine.tokenizer.decode(w["cont"]).encode()) for w in wins)
            dense_bpb = sum(nll["dense"]) / math.log(2) / nbytes
            for k, v in nll.items():
                if k == "dense" and dense_done:
                    continue
                name, kept = _split(k)
                bpb = sum(v) / math.log(2) / nbytes
                res.add({"section": "quality", "group": group, "text": tname, "length": L, "policy": name,
                         "kept": kept, "bits_per_byte": bpb, "delta_pct": 100 * (bpb / dense_bpb - 1),
                         "nll": v, "windows": len(wins), "cont_tokens": CONT, "cont_bytes": nbytes,
                         "kv_tokens_after_context": kv_tokens[k], "kv_bytes_after_context": kv_bytes[k],
                         "kv_share_of_dense": kv_bytes[k] / kv_bytes["dense"],
                         "seconds_all_policies": time.perf_counter() - t0})


def run_retrieval(engine: Engine, prof: LongProfile, prose: str, res: Results, say) -> None:
    for L in prof.probe_lengths:
        for variant in prof.variants:
            group = f"{variant}-{L}"
            pols = _missing(res, "retrieval", group, policy_set(prof))
            dense_done = res.have(section="retrieval", group=group, policy="dense", kept=1.0)
            if not pols and dense_done:
                continue
            ps = probe_set(engine, prose, L, prof.depths, variant)
            got: dict[str, list[bool]] = {k: [] for k in ["dense", *pols]}
            for j, p in enumerate(ps):
                say(f"retrieval {group}: probe {j + 1}/{len(ps)}")
                room = len(p["question"]) + p["max_new"] + 1
                for k, (last, c, pl) in caches_for(engine, p["context"], pols, room).items():
                    toks = greedy_answer(engine, c, p["question"], p["max_new"], pl, last)
                    got[k].append(answered(engine, toks, p["answer"]))
            for k, v in got.items():
                if k == "dense" and dense_done:
                    continue
                name, kept = _split(k)
                res.add({"section": "retrieval", "group": group, "variant": variant, "length": L, "policy": name,
                         "kept": kept, "accuracy": sum(v) / len(v), "correct": v,
                         "depths": [p["depth"] for p in ps],
                         "context_tokens": [len(p["context"]) for p in ps]})


def run_prefill(engine: Engine, prof: LongProfile, prose: str, res: Results, say) -> None:
    """Time to first token at long context: dense and each prefill-saving policy, interleaved in one process."""
    ids = engine.tokenizer.encode(prose)
    for L in prof.prefill_lengths:
        group = f"prefill-{L}"
        pols = _missing(res, "prefill", group,
                        {f"{n}@{k:g}": kv.get(n, k) for n in prof.prefill_policies for k in prof.kept})
        if not pols and res.have(section="prefill", group=group, policy="dense", kept=1.0):
            continue
        prompt = torch.tensor([ids[:L]], device=engine.device)

        say(f"prefill {L}: dense and {', '.join(pols)}, interleaved")
        t = interleaved({"dense": _prefill_timer(engine, prompt, None),
                         **{k: _prefill_timer(engine, prompt, p) for k, p in pols.items()}}, warmup=1,
                        repeats=prof.prefill_repeats)
        for k in ["dense", *pols]:
            name, kept = _split(k)
            if k == "dense" and res.have(section="prefill", group=group, policy="dense", kept=1.0):
                continue
            res.add({"section": "prefill", "group": group, "length": L, "policy": name, "kept": kept,
                     "prefill_s": t[k], "ttft_speedup": paired_ratio(t["dense"], t[k])})


def run_timing(engine: Engine, prof: LongProfile, prose: str, res: Results, say) -> None:
    ids = engine.tokenizer.encode(prose)
    for L in prof.timing_lengths:
        group = f"decode-{L}"
        pols = _missing(res, "timing", group,
                        {f"{n}@{prof.timing_kept:g}": kv.get(n, prof.timing_kept) for n in prof.timing_policies})
        dense_done = res.have(section="timing", group=group, policy="dense", kept=1.0)
        if not pols and dense_done:
            continue
        prompt = ids[:L - prof.decode_tokens]
        # a rerun times the missing policies against a dense run of its own (each ratio is paired in one run)
        configs: dict[str, kv.KVPolicy | None] = {"dense": None, **pols}
        caches, prefill_s, floor = {}, {}, {}
        for k, pol in configs.items():
            say(f"timing {group}: prefill {k}")
            c = engine.new_cache(1, len(prompt) + prof.decode_tokens + 1, shrinking=pol is not None and pol.shrinks)
            t0 = time.perf_counter()
            engine.forward(torch.tensor([prompt]), c, pol.planner(engine) if pol else None, logits="last")
            prefill_s[k] = time.perf_counter() - t0
            caches[k], floor[k] = c, c.length

        say(f"timing {group}: decode, interleaved")
        t = interleaved({k: _decode_timer(engine, caches[k], floor[k], prompt[-1], prof.decode_tokens)
                         for k in configs}, warmup=1, repeats=prof.repeats)
        for k in configs:
            name, kept = _split(k)
            c = caches[k]
            c.truncate(floor[k])
            if k == "dense" and dense_done:
                continue
            res.add({"section": "timing", "group": group, "length": L, "policy": name, "kept": kept,
                     "prompt_tokens": len(prompt), "prefill_s": prefill_s[k], "decode_s_per_token": t[k],
                     "decode_speedup": paired_ratio(t["dense"], t[k]), "dense_decode_s_per_token": t["dense"],
                     "kv_tokens": c.length, "kv_bytes": c.nbytes()})
        del caches


def _prefill_timer(engine: Engine, prompt: torch.Tensor, pol: kv.KVPolicy | None):
    """A timed function: one prefill of ``prompt`` into a new cache (the time to first token)."""
    def run() -> None:
        c = engine.new_cache(1, prompt.shape[1] + 1, shrinking=pol is not None and pol.shrinks)
        engine.forward(prompt, c, pol.planner(engine) if pol else None, logits="last")
    return run


def _decode_timer(engine: Engine, c: Any, floor: int, tok: int, n: int):
    """A timed function: ``n`` decode steps from the cache as prefilled (rewound first), seconds per step."""
    x = torch.tensor([[tok]], device=engine.device)

    def run() -> float:
        c.truncate(floor)
        t0 = time.perf_counter()
        for _ in range(n):
            engine.forward(x, c, None, logits="last", phase="decode")
        return (time.perf_counter() - t0) / n
    return run


def memory_probe(model: str, weights: str | None, length: int, spec: str | None, decode: int, threads: int
                 ) -> dict[str, Any]:
    """One configuration in this fresh process: load, prefill ``length`` tokens, decode; the peak RSS and the KV
    bytes held (run by ``run_memory`` as ``python -m ponder.eval.longctx memory ...``)."""
    torch.set_num_threads(threads)
    e = load(model, weights=weights)
    rss_loaded = rss_peak_bytes()
    ids = e.tokenizer.encode(repo_data("prose.txt").read_text())[:length - decode]
    pol = kv.get(spec.split("@")[0], float(spec.split("@")[1])) if spec else None
    reset = rss_peak_reset()  # the peak from here on: prefill and decode, not the load (which can peak higher)
    c = e.new_cache(1, len(ids) + decode + 1, shrinking=pol is not None and pol.shrinks)
    with torch.inference_mode():
        e.forward(torch.tensor([ids]), c, pol.planner(e) if pol else None, logits="last")
        x = torch.tensor([[ids[-1]]])
        for _ in range(decode):
            e.forward(x, c, None, logits="last", phase="decode")
    return {"peak_rss": rss_peak_bytes(), "rss_after_load": rss_loaded, "peak_since": "load" if reset else "start",
            "kv_bytes": c.nbytes(), "kv_tokens": c.length}


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # the allocator setting a shrinking cache makes, for all


def run_memory(prof: LongProfile, model: str, weights: str | None, threads: int, res: Results, say) -> None:
    """Each configuration in ``prof.memory_repeats`` fresh processes, dense ones too under the allocator setting a
    shrinking cache makes (``release_freed_buffers``), so the difference is the cache's alone."""
    for L in prof.timing_lengths:
        for spec in [None, *(f"{n}@{prof.timing_kept:g}" for n in prof.memory_policies)]:
            name, kept = _split(spec) if spec else ("dense", 1.0)
            group = f"memory-{L}"
            if res.have(section="memory", group=group, policy=name, kept=kept):
                continue
            cmd = [sys.executable, "-m", "ponder.eval.longctx", "memory", model, weights or "", str(L), spec or "",
                   str(prof.decode_tokens), str(threads)]
            runs = _fresh_runs(cmd, prof.memory_repeats, f"memory {L}: {spec or 'dense'}", say)
            res.add(_memory_row(runs, group=group, length=L, policy=name, kept=kept))


def _fresh_runs(cmd: list[str], n: int, label: str, say) -> list[dict[str, Any]]:
    """A memory probe ``cmd`` in ``n`` fresh processes under ``MEMORY_ENV``; each prints its JSON line last."""
    env = {**os.environ, **MEMORY_ENV}
    runs = []
    for j in range(n):
        say(f"{label} in a fresh process ({j + 1}/{n})")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise PonderError(f"the memory probe ({label}) failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def _memory_row(runs: list[dict[str, Any]], **key: Any) -> dict[str, Any]:
    """One configuration's memory row: its first run's fields, the peak as median and range over the runs."""
    peaks = [m["peak_rss"] for m in runs]
    return {"section": "memory", **key, **runs[0], "peak_rss": statistics.median(peaks), "peak_rss_min": min(peaks),
            "peak_rss_max": max(peaks), "runs": runs, "env": MEMORY_ENV}


def kvpress_python(root: Path) -> Path | None:
    p = root / ".venv-kvpress" / "bin" / "python"
    return p if p.is_file() else None


def run_kvpress(engine: Engine, prof: LongProfile, texts: dict[str, str], res: Results, out: Path, threads: int,
                say) -> str | None:
    """kvpress's presses on the same windows and probes; returns why it did not run, or None."""
    root = Path(__file__).resolve().parents[3]
    py = kvpress_python(root)
    if py is None:
        return "kvpress's environment is missing: run scripts/setup_kvpress.sh"
    path = Path(engine.path) if engine.path is not None else None
    if path is None or not path.is_file() or path.suffix != ".gguf":
        return "kvpress loads the model through transformers from a GGUF file; this engine was not opened from one"
    job: dict[str, Any] = {"gguf": str(path), "threads": threads, "presses": list(prof.kvpress_presses),
                           "probe_presses": list(prof.kvpress_probe_presses), "kept": list(prof.kept),
                           "quality": {}, "retrieval": {}}
    for tname, text in texts.items():
        ids = engine.tokenizer.encode(text)
        for L in prof.kvpress_lengths:
            job["quality"][f"{tname}-{L}"] = {"windows": quality_windows(ids, L, prof.windows)}
    for L in prof.kvpress_probe_lengths:
        for variant in prof.kvpress_variants:
            job["retrieval"][f"{variant}-{L}"] = {"probes": probe_set(engine, texts["prose"], L, prof.depths,
                                                                       variant)}
    ids = engine.tokenizer.encode(texts["prose"])
    job["timing"] = {"prompts": {f"decode-{L}": ids[:L - prof.decode_tokens] for L in prof.timing_lengths},
                     "presses": list(prof.kvpress_timing_presses), "kept": prof.timing_kept,
                     "decode_tokens": prof.decode_tokens, "repeats": prof.repeats}
    jp, op = out / "kvpress-job.json", out / "kvpress-raw.jsonl"
    jp.write_text(json.dumps(job))
    say("kvpress: running its presses in its own environment (see kvpress-raw.jsonl)")
    r = subprocess.run([str(py), str(Path(__file__).with_name("kvpress_peer.py")), str(jp), str(op)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"kvpress failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    raw = [json.loads(x) for x in op.read_text().splitlines() if x.strip()]
    meta_p = op.parent / (op.stem + ".meta.json")
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    dense = {r["group"]: r for r in raw if r["press"] == "none"}
    for r in raw:
        g = r["group"]
        row = {"section": r["section"], "peer": "kvpress", "group": g, "policy": r["press"], "kept": r["kept"],
               "press_class": r.get("press_class"), "versions": meta, "gguf": str(path)}
        if res.have(**row):
            continue
        if r["section"] == "quality":
            wins = job["quality"][g]["windows"]
            nbytes = sum(len(engine.tokenizer.decode(w["cont"]).encode()) for w in wins)
            bpb = sum(r["nll"]) / math.log(2) / nbytes
            d = sum(dense[g]["nll"]) / math.log(2) / nbytes if g in dense else None
            row.update({"bits_per_byte": bpb, "delta_pct": 100 * (bpb / d - 1) if d else None, "nll": r["nll"],
                        "seconds": r["seconds"], "text": g.split("-")[0], "length": int(g.split("-")[1])})
        elif r["section"] == "timing":
            row.update({k: r[k] for k in ("prompt_tokens", "prefill_s", "decode_s_per_token", "decode_speedup",
                                          "kv_bytes", "kv_tokens")})
            row["length"] = int(g.split("-")[1])
        else:
            ps = job["retrieval"][g]["probes"]
            ok = [answered(engine, a, p["answer"]) for a, p in zip(r["answers"], ps)]
            row.update({"accuracy": sum(ok) / len(ok), "correct": ok, "variant": g.split("-")[0],
                        "length": int(g.split("-")[1])})
        res.add(row)
    return _kvpress_memory(py, path, prof, ids, res, out, threads, say)


def _kvpress_memory(py: Path, gguf: Path, prof: LongProfile, ids: list[int], res: Results, out: Path, threads: int,
                    say) -> str | None:
    """Peak RSS of a fresh kvpress process per configuration, under the allocator setting ponder's probes run with
    (the same comparison: only the cache differs); returns why it failed, or None."""
    for L in prof.timing_lengths if prof.memory else ():
        prompt = out / f"kvpress-prompt-{L}.json"
        prompt.write_text(json.dumps(ids[:L - prof.decode_tokens]))
        for name in prof.kvpress_memory_presses:
            kept = 1.0 if name == "none" else prof.timing_kept
            group = f"memory-{L}"
            if res.have(section="memory", peer="kvpress", group=group, policy=name, kept=kept):
                continue
            cmd = [str(py), str(Path(__file__).with_name("kvpress_peer.py")), "--memory", str(gguf), str(prompt), name,
                   str(kept), str(prof.decode_tokens), str(threads)]
            try:
                runs = _fresh_runs(cmd, prof.memory_repeats, f"kvpress memory {L}: {name}", say)
            except PonderError as e:
                return str(e)
            res.add(_memory_row(runs, peer="kvpress", group=group, length=L, policy=name, kept=kept))
    return None


# ---- the run and its report -----------------------------------------------------------------------------------
SECTIONS = ("quality", "retrieval", "prefill", "timing", "memory", "kvpress")


def run_long_bench(engine: Engine, model: str, weights: str | None, profile: str, out_dir: str | Path,
                   kvpress_peer: bool = True, threads: int = 2, say=print,
                   sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every section of ``sections`` in order (timing and memory never overlap anything else in this process);
    the report is rewritten from every row the folder holds."""
    if profile not in PROFILES:
        raise PonderError(f"unknown long-context profile {profile!r}; choose {', '.join(PROFILES)}")
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise PonderError(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    prof = PROFILES[profile]
    need = max(max(prof.quality_lengths) + CONT, max(prof.probe_lengths) + 9, max(prof.timing_lengths))
    if need > engine.cfg.max_position_embeddings:
        raise PonderError(f"profile {profile} needs {need} tokens of context but the model's window is "
                          f"{engine.cfg.max_position_embeddings}; use a smaller profile")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out)
    texts = {"code": repo_data("code.txt").read_text(), "prose": repo_data("prose.txt").read_text()}
    mp = out / "meta.json"
    meta = json.loads(mp.read_text()) if mp.is_file() else {}
    meta.update({"model": model, "weights": engine.weights_form, "profile": profile,
                 "profile_settings": asdict(prof), "env": environment(engine.device, engine.dtype),
                 "commit": git_commit()})
    runs = meta.setdefault("runs", [])
    t0 = time.perf_counter()
    with torch.inference_mode():
        if "quality" in sections:
            run_quality(engine, prof, texts, res, say)
        if "retrieval" in sections:
            run_retrieval(engine, prof, texts["prose"], res, say)
        if "prefill" in sections:
            run_prefill(engine, prof, texts["prose"], res, say)
        if "timing" in sections:
            run_timing(engine, prof, texts["prose"], res, say)
    if "memory" in sections and prof.memory:
        run_memory(prof, model, weights, threads, res, say)
    if "kvpress" in sections and prof.kvpress_presses:
        why = run_kvpress(engine, prof, texts, res, out, threads, say) if kvpress_peer else "--no-kvpress"
        meta["kvpress"] = why or "ran"
        if why:
            say(f"kvpress not run: {why}")
    runs.append({"sections": list(sections), "seconds": round(time.perf_counter() - t0, 1),
                 "commit": meta["commit"]})
    meta["seconds"] = sum(r["seconds"] for r in runs)
    mp.write_text(json.dumps(meta, indent=1) + "\n")
    (out / "report.md").write_text(report(res.rows, meta))
    return meta


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def _speedup(r: dict[str, Any], key: str) -> str:
    s = r.get(key)
    return "1 (reference)" if r["policy"] == "dense" or not s else f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def _policy_table(rows: list[dict[str, Any]], groups: list[str], heads: list[str], cell) -> list[str]:
    """One row per (peer, policy, kept), one column per group: dense first, then by kept fraction, kvpress last."""
    out = ["| policy | kept | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(groups)]
    by = {(r.get("peer", "ponder"), r["policy"], r["kept"], r["group"]): r for r in rows}
    seen = sorted({k[:3] for k in by}, key=lambda t: (t[0] != "ponder", t[1] not in ("dense", "none"), -t[2], t[1]))
    for peer, pol, kept in seen:
        cells = ["" if (peer, pol, kept, g) not in by else cell(by[peer, pol, kept, g]) for g in groups]
        label = pol if peer == "ponder" else f"kvpress {pol}"
        out.append(f"| {label} | {kept:g} | " + " | ".join(cells) + " |")
    return out + [""]


def _label(r: dict[str, Any]) -> str:
    return r["policy"] if r.get("peer", "ponder") == "ponder" else f"{r['peer']} {r['policy']}"


def _peer_order(r: dict[str, Any]) -> tuple:
    """A length's rows: ponder's dense, ponder's policies, then the peer's own dense and presses."""
    return (r["length"], r.get("peer", "ponder") != "ponder", r["policy"] not in ("dense", "none"), r["policy"])


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta.get("env", {})
    L = [f"# Long context: KV selection on {meta['model']} ({meta['weights']}), profile {meta['profile']}", "",
         f"Machine: {env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads, torch {env.get('torch', '?')}; "
         f"commit {meta.get('commit')}; kvpress: {meta.get('kvpress')}.", ""]
    q = [r for r in rows if r["section"] == "quality"]
    if q:
        groups = sorted({r["group"] for r in q}, key=lambda g: (g.split("-")[0], int(g.split("-")[1])))
        L += ["## Quality: bits per byte of 64 continuation tokens after the cut context (change vs dense)", ""]
        L += _policy_table(q, groups, groups, lambda r: f"{r['bits_per_byte']:.4f}" if r["policy"] in (
            "dense", "none") else _pct(r.get("delta_pct")))
        shares = {(r["policy"], r["kept"]): r["kv_share_of_dense"] for r in q if "kv_share_of_dense" in r
                  and r["policy"] != "dense" and r["group"] == groups[0]}
        if shares:
            L += [f"KV bytes held after the context, share of dense ({groups[0]}): " + ", ".join(
                f"{p}@{k:g} {100 * v:.0f}%" for (p, k), v in sorted(shares.items())) + " (the room for the "
                "continuation included). For mikv and razor, kept is the share of the prompt's KV bytes (mikv: the "
                "other tokens at 4 bits; razor: a few heads whole, the others a window); for the others, the share "
                "of its tokens.", ""]
    rt = [r for r in rows if r["section"] == "retrieval"]
    if rt:
        groups = sorted({r["group"] for r in rt}, key=lambda g: (int(g.split("-")[1]), g))
        n = {r["group"]: len(r["correct"]) for r in rt}
        L += ["## Retrieval: accuracy (facts at several depths; the question asked after the cut)", ""]
        L += _policy_table(rt, groups, [f"{g} (n={n[g]})" for g in groups], lambda r: f"{r['accuracy']:.2f}")
    pf = [r for r in rows if r["section"] == "prefill"]
    if pf:
        L += ["## Time to first token: prefill at long context, batch 1 (interleaved with dense)", "",
              "| length | policy | kept | prefill s (min-max) | speedup (min-max) |", "|---:|---|---:|---:|---:|"]
        for r in sorted(pf, key=lambda r: (r["length"], r["policy"] != "dense", -r["kept"])):
            t = r["prefill_s"]
            L.append(f"| {r['length']} | {r['policy']} | {r['kept']:g} | {t['median']:.2f} ({t['min']:.2f}-"
                     f"{t['max']:.2f}) | {_speedup(r, 'ttft_speedup')} |")
        L.append("")
    tm = [r for r in rows if r["section"] == "timing"]
    if tm:
        L += ["## Time: decode at long context, batch 1 (interleaved with dense, one process)", "",
              "| length | policy | kept | prefill s | decode ms/token (min-max) | decode speedup (min-max) | "
              "KV held |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted(tm, key=_peer_order):
            d = r["decode_s_per_token"]
            L.append(f"| {r['length']} | {_label(r)} | {r['kept']:g} | {r['prefill_s']:.2f} | "
                     f"{1e3 * d['median']:.2f} ({1e3 * d['min']:.2f}-{1e3 * d['max']:.2f}) | "
                     f"{_speedup(r, 'decode_speedup')} | "
                     f"{r['kv_bytes'] / 2**20:.1f} MiB ({r['kv_tokens']} tok) |")
        L.append("")
        if any(r.get("peer") for r in tm):
            L += ["kvpress rows: transformers loading the same GGUF in kvpress's own process, run after ponder's "
                  "(never at the same time), timed round-robin there; their speedups are against their own dense "
                  "(`none`), ponder's against ponder's.", ""]
    mem = [r for r in rows if r["section"] == "memory"]
    if mem:
        L += ["## Memory: peak resident set of a fresh process during prefill and decode (the peak counter reset "
              "once the model is loaded; median of runs, min-max)", "",
              "| length | policy | kept | peak RSS | below dense | KV held | KV freed vs dense |",
              "|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted(mem, key=_peer_order):
            d = next((x for x in mem if x["length"] == r["length"] and x["policy"] in ("dense", "none")
                      and x.get("peer") == r.get("peer")), None)
            below = freed = "-"
            if d and r is not d:
                below = f"{(d['peak_rss'] - r['peak_rss']) / 2**20:.0f} MiB"
                freed = f"{(d['kv_bytes'] - r['kv_bytes']) / 2**20:.0f} MiB"
            rng = f" ({r['peak_rss_min'] / 2**20:.0f}-{r['peak_rss_max'] / 2**20:.0f})" if "peak_rss_min" in r else ""
            L.append(f"| {r['length']} | {_label(r)} | {r['kept']:g} | {r['peak_rss'] / 2**20:.0f} MiB{rng} | "
                     f"{below} | {r['kv_bytes'] / 2**20:.0f} MiB | {freed} |")
        L.append("")
    return "\n".join(L) + "\n"


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "memory":
        model, weights, length, spec, decode, threads = argv[1:7]
        print(json.dumps(memory_probe(model, weights or None, int(length), spec or None, int(decode),
                                      int(threads))))
        return 0
    raise SystemExit("usage: python -m ponder.eval.longctx memory MODEL WEIGHTS LENGTH SPEC DECODE THREADS")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
