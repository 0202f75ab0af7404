"""`ponder bench` for language models: every policy at every budget, measured against dense in one process.

For each (policy, budget) point the bench measures, on the same loaded weights:
- quality: perplexity on held-out code (and prose), KL(dense || policy) and top-1 agreement on the same windows,
  greedy exact match with dense and where it first diverges, probe exact match;
- compute, from the engine's own counters: executed FLOP fraction (and its spread across sequences), weight-byte
  fraction, KV written;
- time: prefill and decode (batch 1 and batch 8), each interleaved with dense (see ``timing``), plus peak memory.

Two rows keep the yardstick honest: ``dense-control`` times dense against itself (its speedup must read ~1.0, or
the machine was too noisy to trust the others), and ``transformers-generate`` times the same checkpoint in
transformers' ``generate`` beside ponder's dense path. Policies that only simulate their savings (``real=False``)
are never timed.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import load, resolve_model
from ..engine.forward import Engine
from ..engine.generate import SamplingConfig, generate
from ..engine.stats import ATTN, KV
from ..errors import PonderError
from ..models.gguf_tokenizer import render_chat
from ..policies import registry
from ..policies.calibration import calibration_ids
from . import envinfo, quality, timing
from .metrics import evaluate_text, read_text, text_ids
from .peers import LLAMACPP_F32, LLAMACPP_FILE, PEER, llamacpp_row, transformers_row
from .points import (
    CONTROL,
    BenchSettings,
    default_policies,
    drop_unshipped,
    plan_points,
)
from .prompts import load_instruct
from .report.build import build_report
from .sweep import NOISE_BAND, ResultsFile, point_key, progress, settings_hash


@dataclass
class DenseRef:
    """Dense measurements every policy point is compared with (computed once per run)."""

    ppl: dict[str, Any]
    prose_ppl: dict[str, Any] | None
    logits: quality.LogitReference
    greedy: quality.GreedyRun
    probes: dict[str, Any] | None


@dataclass
class Bench:
    engine: Engine
    settings: BenchSettings
    out: ResultsFile
    model_id: str
    fingerprint: dict[str, Any]
    show_progress: bool = True
    notes: list[str] = field(default_factory=list)

    # ---- inputs, cut once ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        s = self.settings
        self.code_text = read_text(s.data)
        self.prose_text = read_text(s.prose) if s.prose and s.prose_tokens > 0 else None
        self.code_ids = text_ids(self.engine, self.code_text)
        ctx = self.engine.cfg.max_position_embeddings
        self.window = min(256, ctx)
        self.kl_windows = quality.cut_windows(self.code_ids, self.window, s.kl_tokens)
        if not self.kl_windows:
            raise PonderError(f"{s.data} is too short: it needs at least a few tokens of text")
        p_len = min(s.prompt_tokens, ctx - max(s.new_tokens, s.timing_tokens))
        # prompts come from beyond the perplexity prefix where the text is long enough (different code to read)
        skip = s.ppl_tokens if len(self.code_ids) > s.ppl_tokens + 4 * (p_len + s.new_tokens) else 0
        self.prompts = quality.cut_prompts(self.code_ids, s.prompts, p_len, skip)
        self.prefill_prompt = self.code_ids[1:1 + min(s.prefill_tokens, ctx - 1)]
        self.decode_prompts = quality.cut_prompts(self.code_ids, max(1, s.decode_batch), p_len, skip)
        self.probe_list = (quality.load_probes(s.probes_file, s.probes)
                           if s.probes_file and s.probes > 0 and self.engine.tokenizer is not None else [])
        self.grounded = self._grounded_prompts()
        self._ref: DenseRef | None = None
        self._marks: list[tuple[str, float]] = []
        self.env = envinfo.environment(self.engine.device, self.engine.dtype)
        self.env["weights"] = self.engine.weights_form  # every row's weight form: native blocks or float
        self.settings_fields = self.settings.key_fields(self.engine)
        self.skey = settings_hash(self.settings_fields)

    def _grounded_prompts(self) -> list[list[int]]:
        """The input-grounded instruction prompts as token ids, through the model's chat template (none without one)."""
        s, e = self.settings, self.engine
        if not s.instruct_file or s.instruct_prompts <= 0 or not e.chat_template or e.tokenizer is None:
            return []
        room = e.cfg.max_position_embeddings - s.instruct_tokens
        out = []
        for it in load_instruct(s.instruct_file, grounded=True)[: s.instruct_prompts]:
            ids = e.tokenizer.encode(render_chat(e.chat_template, it["messages"]))
            if 0 < len(ids) <= room:
                out.append(ids)
        return out

    # ---- the dense reference ---------------------------------------------------------------------------------
    def ref(self, bar=None) -> DenseRef:
        if self._ref is None:
            self._say(bar, "dense reference")
            e, s = self.engine, self.settings
            ppl = self._ppl(None, self.code_text, s.ppl_tokens)
            prose = self._ppl(None, self.prose_text, s.prose_tokens) if self.prose_text else None
            logits = quality.LogitReference.build(e, self.kl_windows)
            g = quality.greedy(e, None, self.prompts, s.new_tokens)
            pr = quality.probe_accuracy(e, None, self.probe_list) if self.probe_list else None
            self._ref = DenseRef(ppl, prose, logits, g, pr)
        return self._ref

    def _ppl(self, policy: Any, text: str | None, n: int) -> dict[str, Any] | None:
        if not text or n <= 0:
            return None
        r = evaluate_text(self.engine, text, policy, max_tokens=n)
        r.pop("logprobs", None)
        return r

    def _say(self, bar, what: str) -> None:
        """Show the phase on the progress bar and remember when it began (rows record seconds per phase)."""
        self._marks.append((what.split(": ")[-1], time.perf_counter()))
        if bar is not None:
            bar.set_postfix_str(what)

    def _phases(self) -> dict[str, float]:
        """Seconds spent per phase since the last call (where a slow policy spends its time)."""
        marks = self._marks + [("", time.perf_counter())]
        out: dict[str, float] = {}
        for (name, t), (_, t2) in zip(marks, marks[1:]):
            out[name] = round(out.get(name, 0.0) + t2 - t, 3)
        self._marks = []
        return out

    # ---- one point -------------------------------------------------------------------------------------------
    def base_row(self, policy_name: str, budget: float) -> dict[str, Any]:
        return {"task": "lm", "policy": policy_name, "budget": budget, "settings": self.skey,
                "profile": self.settings.profile, "model": self.model_id, **self.fingerprint,
                "n_layers": self.engine.cfg.num_hidden_layers, "bench_settings": self.settings_fields,
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}

    def quality_fields(self, pol: Any, bar=None) -> dict[str, Any]:
        e, s = self.engine, self.settings
        ref = self.ref(bar)
        name = f"{pol.name}@{pol.budget:g}"
        is_dense = getattr(pol, "name", None) == "dense"
        self._say(bar, f"{name}: KL")
        la = quality.logit_agreement(e, pol, ref.logits)  # for dense: the harness checks itself (KL 0, top-1 1)
        if is_dense:  # the rest of dense's numbers are the reference itself
            ppl, prose, g, pr = ref.ppl, ref.prose_ppl, ref.greedy, ref.probes
        else:
            self._say(bar, f"{name}: perplexity")
            ppl = self._ppl(pol, self.code_text, s.ppl_tokens)
            prose = self._ppl(pol, self.prose_text, s.prose_tokens) if self.prose_text else None
            self._say(bar, f"{name}: greedy")
            g = quality.greedy(e, pol, self.prompts, s.new_tokens)
            pr = None
            if self.probe_list:
                self._say(bar, f"{name}: probes")
                pr = quality.probe_accuracy(e, pol, self.probe_list)
        em = quality.exact_match(ref.greedy.tokens, g.tokens)
        wf = la["window_flops_fractions"]
        row: dict[str, Any] = {
            "perplexity": ppl["perplexity"], "perplexity_dense": ref.ppl["perplexity"],
            "perplexity_delta": ppl["perplexity"] / ref.ppl["perplexity"] - 1.0,
            "bits_per_byte": ppl["bits_per_byte"], "ppl_tokens": ppl["tokens_scored"],
            "kl": la["kl"], "top1_agreement": la["top1_agreement"], "kl_tokens": la["kl_tokens"],
            **em,
            # at the perplexity windows (as long as the model's context allows): what the perplexity above bought
            "flops_fraction": ppl["flops_fraction"],
            # the budget kept on held-out text in windows as long as the calibration's (256 tokens): the promise a
            # calibrated policy makes. Adaptive exits spend less on longer contexts, whose later tokens are easier
            # (SmolLM2, early-exit@0.75: 0.741 of dense on 256-token windows of held-out code, 0.58 on one 4096).
            "budget_realized": statistics.fmean(wf), "budget_error": statistics.fmean(wf) - pol.budget,
            "flops_fraction_std": statistics.pstdev(wf) if len(wf) > 1 else 0.0,
            "flops_fraction_min": min(wf), "flops_fraction_max": max(wf), "flops_fraction_samples": len(wf),
            "gen_flops_fraction": statistics.fmean(g.flops_fractions),
            "gen_flops_fraction_std": statistics.pstdev(g.flops_fractions) if len(g.flops_fractions) > 1 else 0.0,
            "weight_bytes_fraction": statistics.fmean(g.weight_bytes_fractions),
            "sample": self.sample(g),
            "extra": g.extra,
        }
        if prose is not None:
            row.update(prose_perplexity=prose["perplexity"], prose_perplexity_dense=ref.prose_ppl["perplexity"],
                       prose_perplexity_delta=prose["perplexity"] / ref.prose_ppl["perplexity"] - 1.0)
        if pr is not None:
            row.update(probe_exact_match=pr["probe_exact_match"],
                       probe_exact_match_dense=ref.probes["probe_exact_match"],
                       probe_by_kind=pr["probe_by_kind"], probes=pr["probes"], probes_truncated=pr["probes_truncated"])
        return row

    def sample(self, g: quality.GreedyRun) -> dict[str, Any] | None:
        """The first greedy sample as token strings with the layers each token ran (for the report's view)."""
        tok = self.engine.tokenizer
        if tok is None or not g.tokens:
            return None
        prompt, new = self.prompts[0], g.tokens[0]
        pieces = _token_pieces(tok, list(prompt) + list(new))
        return {"prompt_len": len(prompt), "pieces": pieces, "layers": g.layers[0][:len(pieces)],
                "n_layers": self.engine.cfg.num_hidden_layers,
                "meaning": "layers in which each token ran attention or its FFN when it was processed as input "
                           "(the last generated token was never processed)"}

    # ---- timing ----------------------------------------------------------------------------------------------
    def _gen_fn(self, pol: Any, prompts: list[list[int]], n: int, per_step: bool) -> Callable[[], Any]:
        e = self.engine
        sc = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_tokens=())

        def run():
            # No counters on either side: a deployment does not run them, and they cost a planned layer more than a
            # dense one (index sets to count), which would bill bookkeeping to the policy. The work is counted in
            # separate runs of the same calls (``compute_fields``).
            res = generate(e, prompts, sc, None, None) if pol is None else pol.generate(e, prompts, sc, None)
            if per_step:  # seconds per decode step: decode time over the tokens produced after the first
                steps = max(1, len(res.tokens[0]) - 1)
                return res.decode_s / steps
            return None

        return run

    def _seq_fn(self, pol: Any, prompts: list[list[int]], n: int, _: Any) -> Callable[[], Any]:
        """Each prompt alone at batch 1, one after another, stopping at the model's end-of-turn token as a chat does
        (a lossless policy stops at the same token): seconds per decode step over all of them."""
        e = self.engine
        sc = SamplingConfig(max_new_tokens=n, temperature=0.0)

        def run():
            dt, steps = 0.0, 0
            for p in prompts:
                res = generate(e, [p], sc, None, None) if pol is None else pol.generate(e, [p], sc, None)
                dt += res.decode_s
                steps += max(1, len(res.tokens[0]) - 1)
            return dt / steps

        return run

    def _grounded_equal(self, pol: Any) -> dict[str, Any]:
        """A lossless policy's greedy tokens on the grounded prompts against dense's (they must be identical)."""
        e, s = self.engine, self.settings
        sc = SamplingConfig(max_new_tokens=s.instruct_tokens, temperature=0.0)
        same = sum(pol.generate(e, [p], sc, None).tokens[0] == generate(e, [p], sc).tokens[0] for p in self.grounded)
        return {"grounded_exact_match": same / len(self.grounded)}

    def timing_fields(self, pol: Any, bar=None, label: str = "") -> dict[str, Any]:
        """Prefill and decode times of ``pol`` (None: dense again, the A/A control) interleaved with dense."""
        s, e = self.settings, self.engine
        t: dict[str, Any] = {}
        notes: list[str] = []
        kinds = [("prefill", [self.prefill_prompt], 1, False),
                 ("decode_b1", self.decode_prompts[:1], s.timing_tokens, True)]
        if s.decode_batch > 1:
            kinds.append((f"decode_b{s.decode_batch}", self.decode_prompts[:s.decode_batch], s.timing_tokens, True))
        # lossless rows whose drafter is chosen by cost model or context (budget 1): layer drafts at a set depth
        # (budget < 1) are timed on continuation only; each grounded timing is a minute or two of chat turns
        grounded = self.grounded and getattr(pol, "lossless", False) and pol.budget >= 1.0
        if grounded:  # one prompt after another at batch 1 (seconds per decode step over all of them)
            kinds.append(("decode_grounded", self.grounded, s.instruct_tokens, "sequential"))
        for kind, prompts, n, per_step in kinds:
            self._say(bar, f"{label}: timing {kind}")
            mk = self._seq_fn if per_step == "sequential" else self._gen_fn
            fns = {"dense": mk(None, prompts, n, per_step), "policy": mk(pol, prompts, n, per_step)}
            try:
                t[kind] = timing.interleaved(fns, warmup=s.warmup, repeats=s.repeats, device=e.device,
                                             min_seconds=s.min_timed_s, max_repeats=max(s.repeats, 25))
            except PonderError as err:
                notes.append(f"{kind}: {err}")
        out: dict[str, Any] = {"timings": t}
        if "prefill" in t:
            out.update(prefill_ms=1e3 * t["prefill"]["policy"]["median"],
                       prefill_ms_dense=1e3 * t["prefill"]["dense"]["median"],
                       prefill_speedup=_paired(t["prefill"]), prefill_speedup_range=_range(t["prefill"]))
        if "decode_grounded" in t:
            g = t["decode_grounded"]
            out.update(decode_ms_per_token_grounded=1e3 * g["policy"]["median"],
                       decode_ms_per_token_grounded_dense=1e3 * g["dense"]["median"],
                       decode_speedup_grounded=_paired(g), decode_speedup_grounded_range=_range(g),
                       grounded_prompts=len(self.grounded))
            out.update(self._grounded_equal(pol))
        for kind in [k for k in t if k.startswith("decode_b")]:
            b = kind[len("decode_"):]
            pm, dm = t[kind]["policy"]["median"], t[kind]["dense"]["median"]
            sfx = "" if b == "b1" else f"_{b}"
            bs = 1 if b == "b1" else s.decode_batch
            out.update({f"decode_ms_per_token{sfx}": 1e3 * pm, f"decode_ms_per_token{sfx}_dense": 1e3 * dm,
                        f"tokens_per_s{sfx}": bs / pm if pm > 0 else None,
                        f"decode_speedup{sfx}": _paired(t[kind]), f"decode_speedup{sfx}_range": _range(t[kind])})
        if notes:
            out["timing_notes"] = notes
        return out

    def compute_fields(self, pol: Any) -> dict[str, Any]:
        """Counters of the exact calls that were timed: the basis of the predicted speedups."""
        e, s = self.engine, self.settings
        out: dict[str, Any] = {}
        sc1 = SamplingConfig(max_new_tokens=1, temperature=0.0, stop_tokens=())
        scn = SamplingConfig(max_new_tokens=s.timing_tokens, temperature=0.0, stop_tokens=())
        a = quality.new_stats(e)
        pol.generate(e, [self.prefill_prompt], sc1, a)
        out["prefill_total_flops_fraction"] = a.total_flops_fraction
        p1, pn = quality.new_stats(e), quality.new_stats(e, record_tokens=True)
        pol.generate(e, self.decode_prompts[:1], sc1, p1)
        pol.generate(e, self.decode_prompts[:1], scn, pn)
        # Everything read, on both sides: the policy's layers, its own checks and its head calls (a draft reads the
        # head too) against dense's layers and one head per step.
        wb = ((pn.weight_bytes + pn.overhead_bytes + pn.head_bytes)
              - (p1.weight_bytes + p1.overhead_bytes + p1.head_bytes))
        dwb = (pn.dense_weight_bytes + pn.dense_head_bytes) - (p1.dense_weight_bytes + p1.dense_head_bytes)
        out["decode_total_weight_bytes_fraction"] = wb / dwb if dwb > 0 else None
        maps = pn.unit_maps
        if maps:
            kv = sum(int(((m & (ATTN | KV)) > 0).sum()) for m in maps)  # attention writes K/V too
            out["kv_written_fraction"] = kv / sum(m.numel() for m in maps)
        B = min(s.decode_batch, len(self.decode_prompts)) or 1
        out["kv_cache_bytes"] = e.new_cache(B, len(self.decode_prompts[0]) + s.timing_tokens).nbytes()
        out["kv_cache_batch"] = B
        return out

    def memory_fields(self, pol: Any) -> dict[str, Any]:
        """Peak memory of one batch decode of the policy (CUDA: allocated; CPU: process RSS high-water mark)."""
        e, s = self.engine, self.settings
        sc = SamplingConfig(max_new_tokens=s.timing_tokens, temperature=0.0, stop_tokens=())
        prompts = self.decode_prompts[:max(1, s.decode_batch)]
        if e.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(e.device)
            pol.generate(e, prompts, sc, None)
            timing.sync(e.device)
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(e.device),
                    "peak_memory_kind": "cuda_allocated"}
        exact = envinfo.rss_peak_reset()
        pol.generate(e, prompts, sc, None)
        return {"peak_memory_bytes": envinfo.rss_peak_bytes(),
                "peak_memory_kind": "rss_peak" if exact else "rss_peak_process_lifetime"}

    def calibrate(self, pol: Any) -> None:
        """Fit the policy on the shipped calibration text (never the evaluation data), cut once per run."""
        if not hasattr(self, "_calib"):
            self._calib = calibration_ids(self.engine, n_tokens=self.settings.calib_tokens)
        pol.calibrate(self.engine, self._calib)

    # ---- rows ------------------------------------------------------------------------------------------------
    def policy_row(self, pol: Any, bar=None, spec: str | None = None) -> dict[str, Any]:
        """One point. ``spec`` (``name:key=value``) labels a variant's row; default: the policy's name."""
        t0 = time.perf_counter()
        label = f"{spec or pol.name}@{pol.budget:g}"
        self._marks = []
        self._say(bar, f"{label}: calibrating")
        self.calibrate(pol)
        row = self.base_row(spec or pol.name, pol.budget)
        row["policy_name"] = pol.name
        row.update(pol.flags())
        row["policy_params"] = {k: v for k, v in pol.params().items() if _json_simple(v)}
        row.update(self.quality_fields(pol, bar))
        self._say(bar, f"{label}: counters")
        row.update(self.compute_fields(pol))
        if pol.real:
            row.update(self.timing_fields(pol, bar, label))
            self._say(bar, f"{label}: memory")
            row.update(self.memory_fields(pol))
        else:
            row["timing_notes"] = ["real=false: the policy simulates its savings, so it is not timed"]
        _add_predictions(row)
        row["env"] = self.env
        row["elapsed_s"] = time.perf_counter() - t0
        row["phase_seconds"] = self._phases()
        return row

    def dense_rows(self, bar=None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The dense row (absolute numbers; its KL of 0 and agreement of 1 check the harness itself) and the A/A
        control row (dense timed against dense, interleaved exactly like every policy)."""
        dense = registry.get("dense", 1.0)
        t0 = time.perf_counter()
        self._marks = []
        row = self.base_row("dense", 1.0)
        row.update(dense.flags())
        row.update(self.quality_fields(dense, bar))
        row.update(self.compute_fields(dense))
        tf = self.timing_fields(dense, bar, CONTROL)
        row.update(self.memory_fields(dense))
        for k, v in tf.items():  # the dense side of the A/A timing is dense's own time
            if k.endswith("_dense"):
                row[k[:-len("_dense")]] = v
        for k in [k for k in row if k.startswith("decode_ms_per_token")]:
            sfx = k[len("decode_ms_per_token"):]
            bs = 1 if sfx in ("", "_grounded") else int(sfx[2:])  # "_b8" -> 8
            row[f"tokens_per_s{sfx}"] = bs * 1e3 / row[k] if row[k] else None
        row.update({k: 1.0 for k in tf
                    if k.startswith(("prefill_speedup", "decode_speedup")) and not k.endswith("_range")})
        row["timings"] = tf.get("timings")
        _add_predictions(row)
        row["env"] = self.env
        row["elapsed_s"] = time.perf_counter() - t0
        row["phase_seconds"] = self._phases()
        ctl = self.base_row(CONTROL, 1.0)
        ctl.update(dense.flags())
        ctl.update(tf)
        ctl.update(_control_verdict(tf))
        ctl["env"] = self.env
        return row, ctl

    def peer_row(self, bar=None) -> dict[str, Any]:
        """transformers' generate on the same checkpoint, interleaved with ponder's dense generate (batch 1)."""
        return transformers_row(self, bar)

    def llamacpp_row(self, which: str, bar=None) -> dict[str, Any]:
        """llama.cpp on the same weights (``f32``: an F32 GGUF of what ponder runs) or on the original file."""
        return llamacpp_row(self, which, bar)


def _token_pieces(tok: Any, ids: list[int]) -> list[str]:
    """Text of each token, decoding incrementally so a character split over tokens lands on the one completing it."""
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        cur = tok.decode(ids[:k])
        if cur.endswith("\ufffd"):
            out.append("")
            continue
        out.append(cur[len(prev):] if cur.startswith(prev) else tok.decode([ids[k - 1]]))
        prev = cur
    return out


def _paired(t: dict[str, Any]) -> float | None:
    r = timing.paired_ratio(t.get("dense"), t.get("policy"))
    return r["median"] if r else None


def _range(t: dict[str, Any]) -> list[float] | None:
    r = timing.paired_ratio(t.get("dense"), t.get("policy"))
    return [r["min"], r["max"]] if r else None


def _json_simple(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool)) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v))


def _add_predictions(row: dict[str, Any]) -> None:
    """Predicted speedups from the executed work, and how much of each the clock actually showed."""
    pf, wb = row.get("prefill_total_flops_fraction"), row.get("decode_total_weight_bytes_fraction")
    row["predicted_prefill_speedup"] = 1.0 / pf if pf else None
    row["predicted_decode_speedup"] = 1.0 / wb if wb else None
    for ph in ("prefill", "decode"):
        m, p = row.get(f"{ph}_speedup"), row.get(f"predicted_{ph}_speedup")
        row[f"{ph}_realization"] = m / p if (m and p) else None
    row["realization"] = row.get("decode_realization")


def _control_verdict(tf: dict[str, Any]) -> dict[str, Any]:
    """Dense against dense must read ~1.0 on every measurement; otherwise the machine was too noisy to trust."""
    vals = {k: v for k, v in tf.items() if k.startswith(("prefill_speedup", "decode_speedup"))
            and not k.endswith("_range") and isinstance(v, (int, float))}
    lo, hi = NOISE_BAND
    bad = {k: v for k, v in vals.items() if not lo <= v <= hi}
    return {"control_ok": not bad and bool(vals), "control_out_of_band": bad, "control_band": list(NOISE_BAND)}


# ---- the sweep ---------------------------------------------------------------------------------------------------

def run_lm_bench(model: str, policies: list[str], budgets: list[float], out_dir: str | Path,
                 settings: BenchSettings, dtype: str | None = None, device: str | None = None,
                 show_progress: bool = True, write_report: bool = True, weights: str | None = None,
                 quantize: str | None = None) -> dict[str, Any]:
    """Measure every (policy, budget) point not yet in ``out_dir/results.jsonl``; returns a summary dict."""
    for p in (settings.data, settings.prose):
        if p:
            read_text(p)  # missing / empty / not UTF-8: one clear line before the model is even loaded
    points = plan_points(policies, budgets)
    folder = resolve_model(model)
    is_gguf = Path(folder).is_file() and Path(folder).suffix.lower() == ".gguf"
    if not is_gguf and not (Path(folder) / "config.json").is_file():
        raise PonderError(f"{folder} is neither a .gguf file nor a checkpoint folder (no config.json); pass --model "
                          "with a name from `ponder models`, a Hugging Face folder or a .gguf file")
    fp = envinfo.model_fingerprint(folder)
    out = ResultsFile(out_dir, fp)  # refuses a folder holding another model's results before any work
    engine = load(model, dtype=dtype, device=device, weights=weights, quantize=quantize)
    if engine.tokenizer is None:
        raise PonderError(f"{folder} has no tokenizer; the bench needs one to read its evaluation text")
    if policies == default_policies():
        points = drop_unshipped(points, engine)
    bench = Bench(engine, settings, out, str(model), fp, show_progress)
    todo: list[tuple[str, Any]] = []
    if not (out.has(point_key(bench.base_row("dense", 1.0))) and out.has(point_key(bench.base_row(CONTROL, 1.0)))):
        todo.append(("dense", None))
    # llama.cpp on the weights ponder runs: the original file when ponder runs its blocks natively; an F32 copy of
    # the dequantised weights (and the original file, what a user runs today) when ponder runs float32.
    gg = getattr(engine, "gguf", None)
    if gg is None or quantize:
        lc = []
    elif engine.quantised:
        lc = [LLAMACPP_FILE]
    else:
        lc = [LLAMACPP_F32] + ([LLAMACPP_FILE] if gg.file_type != "F32" else [])
    peers = [PEER] + lc
    for name in peers if settings.peer else []:
        if not out.has(point_key(bench.base_row(name, 1.0))):
            todo.append(("peer", name))
    for pt in points:
        if not out.has(point_key(bench.base_row(pt.policy, pt.budget))):
            todo.append(("policy", pt))
    skipped = 1 + (len(peers) if settings.peer else 0) + len(points) - len(todo)
    t0 = time.perf_counter()
    bar = progress(len(todo), "bench", show_progress)
    failures: list[str] = []
    written = 0
    try:
        for kind, pt in todo:
            label = ("dense + A/A control" if kind == "dense" else pt if kind == "peer"
                     else f"{pt.policy}@{pt.budget:g}")
            bar.set_postfix_str(label)
            try:
                if kind == "dense":
                    row, ctl = bench.dense_rows(bar)
                    for r in (row, ctl):
                        if not out.has(point_key(r)):
                            out.append(r)
                            written += 1
                elif kind == "peer":
                    out.append(bench.peer_row(bar) if pt == PEER else
                               bench.llamacpp_row("f32" if pt == LLAMACPP_F32 else "file", bar))
                    written += 1
                else:
                    out.append(bench.policy_row(registry.get(pt.policy, pt.budget), bar, spec=pt.policy))
                    written += 1
            except KeyboardInterrupt:
                raise
            except PonderError as err:  # the policy refuses this point (e.g. an unreachable budget): record why
                if kind != "policy":
                    raise
                row = bench.base_row(pt.policy, pt.budget)
                row.update(registry.get(pt.policy, 1.0).flags())
                row.update(status="error", error=str(err), env=bench.env)
                out.append(row)
                written += 1
                bar.write(f"ponder: note: {label} not measured: {err}")
            except Exception as err:  # noqa: BLE001 - one broken policy must not sink a 20-minute sweep
                failures.append(f"{label}: {type(err).__name__}: {err}")
                bar.write(f"ponder: warning: point {label} failed and was not recorded ({type(err).__name__}: {err})")
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"ponder: interrupted; {written} point(s) of this run are saved in {out.path}; "
              "rerun the same command to continue", file=sys.stderr)
        raise
    bar.close()
    summary = {"out": str(out.dir), "results": str(out.path), "written": written, "skipped": max(0, skipped),
               "failed": failures, "seconds": time.perf_counter() - t0, "settings": bench.skey}
    if write_report:
        summary["report"] = [str(p) for p in build_report(out.dir)]
    return summary


