"""``ponder bench --task embed``: every encoder policy at every budget against dense, on the shipped retrieval set.

Per (policy, budget) point, on the same loaded weights in one process:
- quality: cosine of each passage's and query's embedding to its dense embedding (mean, 1st percentile, min),
  recall@10 of the gold passage (the policy embeds both queries and passages) and overlap@10 with the dense
  ranking;
- compute: FLOPs fraction from the engine's counters over the whole passage set (and with the padding of the
  compacted matrices);
- time: encoder throughput (texts/s, from token ids: tokenisation is the same for every policy and is left out) at
  batch 1 and batch 32, interleaved with dense (``ponder.eval.timing``: warm-up thrown away, rotating order,
  medians with min and max, paired per-round speedups).

``dense-control`` times dense against dense the same way: its speedup must read ~1.0, or the machine was too noisy
to trust the others. Rows go to OUT/results.jsonl (resumable: a rerun skips finished points) and the report to
OUT/report.{html,md} through ``ponder.eval.report.build`` (this package's ``report.build_sections``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import PonderError
from ..eval import envinfo, timing
from ..eval.report.build import build_report
from ..eval.sweep import NOISE_BAND, ResultsFile, parse_budgets, point_key, print_summary, progress, settings_hash
from ..models.bert import attn_block, embed_tokens, ffn_block, key_bias, pool
from ..policies.spec import parse_policy
from .api import calibration_seqs, encode_ids, get_policy, load_encoder, tokenize
from .engine import EncoderStats
from .policies import registry
from .report import CONTROL, headline
from .retrieval import data_dir, load_retrieval, overlap_at_k, rank_topk, recall_at_k

DEFAULT_POLICIES = ("token-prune", "token-prune:score=norm", "token-merge", "token-merge:mode=threshold",
                    "token-exit", "layer-skip")
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
QUICK_BUDGETS = (0.8, 0.6)


@dataclass
class EmbedSettings:
    queries: int = 500  # all shipped queries
    passages: int = 3000  # all shipped passages (gold passages always included)
    timing_texts_b32: int = 128
    timing_texts_b1: int = 16
    warmup: int = 1
    repeats: int = 4
    min_timed_s: float = 1.0
    batch: int = 32
    profile: str = "full"

    @classmethod
    def quick(cls) -> EmbedSettings:
        return cls(queries=150, passages=600, timing_texts_b32=128, timing_texts_b1=12, repeats=3, min_timed_s=0.4,
                   profile="quick")


class EmbedBench:
    def __init__(self, model: str, settings: EmbedSettings, out_dir: str | Path, show_progress: bool = True):
        self.s = settings
        self.eng = load_encoder(model)
        self.model_id = "minilm" if self.eng.name == "minilm" else str(self.eng.path)
        self.fingerprint = envinfo.model_fingerprint(self.eng.path)
        self.out = ResultsFile(out_dir, self.fingerprint)
        self.env = envinfo.environment(torch.device("cpu"), self.eng.W.word.dtype)
        self.show = show_progress
        passages, queries = load_retrieval()
        queries = queries[:settings.queries]
        gold_ids = {q["gold"] for q in queries}
        keep = [p for p in passages if p["id"] in gold_ids]
        keep += [p for p in passages if p["id"] not in gold_ids][:max(0, settings.passages - len(keep))]
        keep.sort(key=lambda p: p["id"])
        index = {p["id"]: k for k, p in enumerate(keep)}
        self.gold = torch.tensor([index[q["gold"]] for q in queries])
        t0 = time.perf_counter()
        self.p_seqs = tokenize(self.eng, [p["text"] for p in keep])[0]
        self.tokenize_s = time.perf_counter() - t0
        self.q_seqs = tokenize(self.eng, [q["text"] for q in queries])[0]
        # timing sets: evenly spaced passages (their length mix is the set's)
        step = max(1, len(self.p_seqs) // settings.timing_texts_b32)
        self.t32 = self.p_seqs[::step][:settings.timing_texts_b32]
        step1 = max(1, len(self.p_seqs) // settings.timing_texts_b1)
        self.t1 = self.p_seqs[::step1][:settings.timing_texts_b1]
        key = {**asdict(settings), "threads": torch.get_num_threads(), "dtype": str(self.eng.W.word.dtype),
               "data": _data_id()}
        self.skey = settings_hash(key)
        self._dense: dict[str, Any] | None = None

    # ---- pieces ------------------------------------------------------------------------------------------------
    def embed_all(self, pol) -> dict[str, Any]:
        st = EncoderStats(self.eng.cfg)
        p = encode_ids(self.eng, self.p_seqs, pol, self.s.batch, st)
        sq = EncoderStats(self.eng.cfg)
        q = encode_ids(self.eng, self.q_seqs, pol, self.s.batch, sq)
        return {"p": p, "q": q, "stats": st, "qstats": sq}

    def dense(self) -> dict[str, Any]:
        if self._dense is None:
            d = self.embed_all(None)
            d["top"] = rank_topk(d["q"], d["p"], 10)
            d["recall"] = recall_at_k(d["top"], self.gold)
            self._dense = d
        return self._dense

    def quality(self, pol) -> dict[str, Any]:
        d = self.dense()
        r = self.embed_all(pol)
        cos = torch.nn.functional.cosine_similarity(r["p"], d["p"], dim=-1).double()
        qcos = torch.nn.functional.cosine_similarity(r["q"], d["q"], dim=-1).double()
        top = rank_topk(r["q"], r["p"], 10)
        rec = recall_at_k(top, self.gold)
        st = r["stats"]
        return {
            "cos_mean": float(cos.mean()), "cos_p1": float(torch.quantile(cos, 0.01)), "cos_min": float(cos.min()),
            "query_cos_mean": float(qcos.mean()), "query_cos_p1": float(torch.quantile(qcos, 0.01)),
            "recall_at_10": rec, "recall_at_10_dense": d["recall"], "recall_drop_points": 100 * (d["recall"] - rec),
            "overlap_at_10": overlap_at_k(top, d["top"]),
            "flops_fraction": st.flops_fraction, "padded_flops_fraction": st.padded_fraction,
            "query_flops_fraction": r["qstats"].flops_fraction,
            "mean_layers_per_token": st.summary()["mean_layers_per_token"],
            "passages": len(self.p_seqs), "queries": len(self.q_seqs),
            "mean_passage_tokens": sum(map(len, self.p_seqs)) / len(self.p_seqs),
        }

    def timing(self, pol) -> dict[str, Any]:
        """Throughput at batch 32 and 1, each interleaved with dense (None: dense again, the A/A control)."""

        def fn(p, seqs, bs):
            return lambda: encode_ids(self.eng, seqs, p, bs)

        s = self.s
        out: dict[str, Any] = {"timings": {}, "loadavg_before": os.getloadavg()[0]}
        for tag, seqs, bs in (("b32", self.t32, 32), ("b1", self.t1, 1)):
            t = timing.interleaved({"dense": fn(None, seqs, bs), "policy": fn(pol, seqs, bs)}, warmup=s.warmup,
                                   repeats=s.repeats, min_seconds=s.min_timed_s, max_repeats=max(s.repeats, 25))
            out["timings"][tag] = t
            n = len(seqs)
            pr = timing.paired_ratio(t["dense"], t["policy"])  # dense time / policy time: the speedup
            out.update({f"texts_per_s_{tag}": n / t["policy"]["median"],
                        f"texts_per_s_{tag}_dense": n / t["dense"]["median"],
                        f"texts_per_s_{tag}_range": [n / t["policy"]["max"], n / t["policy"]["min"]],
                        f"speedup_{tag}": pr["median"] if pr else None,
                        f"speedup_{tag}_range": [pr["min"], pr["max"]] if pr else None,
                        f"timed_texts_{tag}": n})
        out["loadavg_after"] = os.getloadavg()[0]  # other processes on the machine distort every timing
        return out

    def stage_cos(self, n: int = 128) -> list[dict[str, Any]]:
        """Why tokens cannot leave early: per stage, the cosine between the embedding pooled from that stage's
        states (as they are, and through the calibrated affine map) and the real embedding, on n passages."""

        eng = self.eng
        maps = eng.extrapolators(calibration_seqs(eng))
        W, L = eng.W, eng.cfg.num_hidden_layers
        sums = [[0.0, 0.0] for _ in range(2 * L)]
        seqs = self.p_seqs[:n]
        with torch.inference_mode():
            for b in range(0, len(seqs), 32):
                ids, lengths = eng.batch(seqs[b:b + 32])
                valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
                w = valid.to(W.word.dtype)
                x = embed_tokens(W, ids, valid)
                bias = key_bias(valid, None, x.dtype)
                states = []
                for i in range(L):
                    h = attn_block(W, i, x, None, bias)[0]
                    x = ffn_block(W, i, h)
                    states += [h, x]
                final = pool(x, w, "mean", True)
                for k, st in enumerate(states):
                    raw = pool(st, w, "mean", True)
                    A, bb = maps.get(k, (None, None))
                    mapped = pool(st @ A + bb, w, "mean", True) if A is not None else raw
                    sums[k][0] += float(torch.nn.functional.cosine_similarity(raw, final).sum())
                    sums[k][1] += float(torch.nn.functional.cosine_similarity(mapped, final).sum())
        return [{"stage": ("after attention of layer %d" if k % 2 == 0 else "after layer %d") % (k // 2),
                 "raw_cos": a / len(seqs), "mapped_cos": m / len(seqs)} for k, (a, m) in enumerate(sums)]

    def base_row(self, label: str, budget: float) -> dict[str, Any]:
        return {"task": "embed", "policy": label, "budget": budget, "settings": self.skey, "profile": self.s.profile,
                "model": self.model_id, **self.fingerprint, "n_layers": self.eng.cfg.num_hidden_layers,
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}

    # ---- rows --------------------------------------------------------------------------------------------------
    def dense_rows(self) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        dense = registry.get("dense", 1.0)
        row = self.base_row("dense", 1.0)
        row.update(dense.flags())
        row.update(self.quality(None))
        tf = self.timing(None)
        for tag in ("b32", "b1"):
            row[f"texts_per_s_{tag}"] = tf[f"texts_per_s_{tag}_dense"]
            row[f"speedup_{tag}"] = 1.0
        row["tokenize_texts_per_s"] = len(self.p_seqs) / self.tokenize_s if self.tokenize_s > 0 else None
        row["stage_cos"] = self.stage_cos()
        row["env"] = self.env
        row["elapsed_s"] = time.perf_counter() - t0
        ctl = self.base_row(CONTROL, 1.0)
        ctl.update(dense.flags())
        ctl.update(tf)
        vals = [ctl.get("speedup_b32"), ctl.get("speedup_b1")]
        bad = [v for v in vals if v is not None and not NOISE_BAND[0] <= v <= NOISE_BAND[1]]
        ctl.update(control_ok=not bad, control_out_of_band=bad, control_band=list(NOISE_BAND), env=self.env)
        return [row, ctl]

    def policy_row(self, spec: str, budget: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        name, kw = parse_policy(spec)
        pol = get_policy(self.eng, name, budget, **kw)
        cal_s = time.perf_counter() - t0
        row = self.base_row(spec, budget)
        row.update(pol.flags())
        row["policy_name"] = name
        row["policy_params"] = json.loads(json.dumps(pol.params(), default=str))
        row["calibration"] = getattr(pol, "calibration", None)
        row["calibration_s"] = cal_s
        row["calibration_texts"] = len(calibration_seqs(self.eng))
        row.update(self.quality(pol))
        row.update(self.timing(pol))
        row["env"] = self.env
        row["elapsed_s"] = time.perf_counter() - t0
        return row

    def run(self, policies: list[str], budgets: list[float], write_report: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        todo: list[tuple[str, float]] = []
        for spec in policies:
            for b in budgets:
                if spec in ("dense", CONTROL) or b >= 1.0:
                    continue  # budget 1 is the dense path itself (tests check it is identical); the dense row covers it
                todo.append((spec, b))
        written = skipped = 0
        failed: list[str] = []
        need_dense = not (self.out.has(point_key(self.base_row("dense", 1.0)))
                          and self.out.has(point_key(self.base_row(CONTROL, 1.0))))
        bar = progress(len(todo) + (1 if need_dense else 0), "embed bench", self.show)
        if need_dense:
            bar.set_postfix_str("dense + A/A control")
            for r in self.dense_rows():
                if not self.out.has(point_key(r)):
                    self.out.append(r)
                    written += 1
            bar.update()
        for spec, b in todo:
            if self.out.has(point_key(self.base_row(spec, b))):
                skipped += 1
                continue
            bar.set_postfix_str(f"{spec}@{b:g}")
            try:
                self.out.append(self.policy_row(spec, b))
            except PonderError as e:  # the policy refuses this point (an unreachable budget): record why, as lm does
                self.out.append({**self.base_row(spec, b), "status": "error", "error": str(e)})
                bar.write(f"ponder: note: {spec}@{b:g} not measured: {e}")
            written += 1
            bar.update()
        bar.close()
        report: list[str] = []
        if write_report:
            report = [str(p) for p in build_report(self.out.dir)]
        return {"written": written, "skipped": skipped, "failed": failed, "results": str(self.out.path),
                "report": report, "seconds": time.perf_counter() - t0}


def _data_id() -> str:
    m = data_dir() / "manifest.json"
    return json.loads(m.read_text())["sha256"]["passages.jsonl"][:12] if m.is_file() else "missing"


def run_cli(args: argparse.Namespace) -> int:
    """The ``--task embed`` branch of ``ponder bench`` (dispatched by ``ponder.eval.bench_cli.TASKS``)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model = args.model if args.model is not None else "minilm"
    if args.policies in (None, "", "all"):
        policies = list(DEFAULT_POLICIES)
    else:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        known = set(registry.names()) | {CONTROL}
        for p in policies:
            if parse_policy(p)[0] not in known:
                raise PonderError(f"unknown encoder policy {parse_policy(p)[0]!r}; available: "
                                  f"{', '.join(registry.names())}")
    budgets = parse_budgets(args.budgets) if args.budgets else list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    s = EmbedSettings.quick() if args.quick else EmbedSettings()
    if getattr(args, "repeats", None):
        s.repeats = args.repeats
    if getattr(args, "warmup", None) is not None:
        s.warmup = args.warmup
    if getattr(args, "device", None) not in (None, "cpu"):
        raise PonderError("the embed bench runs on CPU only")
    bench = EmbedBench(model, s, args.out, show_progress=not args.no_progress and not args.json)
    summary = bench.run(policies, budgets, write_report=not args.no_report)
    return print_summary(summary, args.json, "embed bench", "row(s) written", headline)
