"""Train a skip router on a frozen base model: distil its dense logits under a budget.

    ponder train router [--model smollm2] [--budget 0.75] [--units attn+ffn|layer]
                        [--estimator soft|ste|gumbel|reinforce] [--tokens 196608] [--minutes M] [--out PATH]
    (also ``ponder train-router ...``; under ``torchrun --nproc_per_node N`` the batches are split across ranks)

What is trained. Per layer a linear run-logit per unit on the layer's RMS-normalised input (``Router``; 2 x 576 + 2
numbers per layer on SmolLM2). The base stays frozen in whatever weight form; the router is a few hundred KB.

Loss. KL(dense || routed) over the full vocabulary, per token, through the model with every unit's update multiplied
by its gate (``LlamaModel.forward(gates=...)``: a 0 gate is exactly the skip the engine executes, K/V still
projected). Plus the budget: the routed fraction of per-token projection FLOPs (attention's Q/O share where attention
runs, its K/V share always, the FFN's where it runs) is held at most at the target. Its price is a Lagrange
multiplier raised while the fraction is over the budget and lowered (to zero at least) while it is under, plus
``rho`` times the last step's excess (a proportional term that damps the multiplier's overshoot); the price is never
negative (measured: a negative one, pushing an under-budget soft router up, saturated every gate at 1 where the
sigmoid's gradient vanishes, and the router never came back), so the realized
fraction meets the target instead of trading against the KL at a weight someone tuned. The deployed offset is fitted
on calibration text after training anyway (``router`` policy), so the promise holds on any text to the
calibration's accuracy.

Estimators (catalog F11.1), for the gradient of a hard 0/1 decision:
``ste``: straight-through, the forward uses the hard decision, the backward the sigmoid's gradient;
``gumbel``: hard Gumbel-sigmoid, logistic noise on the logit at temperature 1 -> 0.5, straight-through on top;
``reinforce``: decisions sampled from the sigmoid, the router learns from the score function only (no gradient
through the model): each token's advantage is its own KL plus the multiplier times its cost, minus a running mean;
``soft``: no hard decision in training at all: gates sigmoid(z / tau), tau annealed 1 -> 0.05 so they end near
0/1 (why: the KL is at its minimum at the dense start, so a gradient taken at a hard 1 says nothing about what a
skip costs; a soft gate's gradient is taken between the two states).

Resumable: every ``CKPT_EVERY`` steps the router, the optimiser's moments, the multiplier and the step go to
``<out>.partial.safetensors``; a rerun of the same command continues from there. Held-out numbers in the card come
from the evaluation files (never trained on), with the offset fitted on the calibration text as a user gets it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..api import load
from ..engine.forward import Engine
from ..errors import PonderError
from ..eval.envinfo import environment
from ..eval.metrics import evaluate_text, text_ids
from ..eval.points import repo_data
from ..models.adapters import ROUTER_UNITS, Router, adapter_paths, fingerprint, router_logits, save_adapter
from ..policies.base import unit_shares
from ..policies.budget import realized
from ..policies.calibration import calib_path, calibration_ids
from ..policies.router import SkipRouter
from .draft import chat_generated
from .translators import SEQ, training_ids

ESTIMATORS = ("ste", "gumbel", "reinforce", "soft")
CKPT_EVERY = 10
MICRO = 2  # sequences per forward/backward (gradients accumulated to the batch)
BF16 = False  # measured: bfloat16 routed passes ran ~1.15x faster but learned far worse (KL 2-3 vs 0.2-1)
SOFT_TAU_END = 0.05
IMPORTANCE_SEQS = 2  # calibration sequences for the per-unit ablation of the static start
INIT_BIAS = 2.0  # sigmoid(2) = 0.88: training starts from the dense model, near enough to the threshold to move


@dataclass
class RouterTraining:
    """What a run needs besides the data. ``steps``: an upper bound; ``minutes``: a wall-clock bound (equal-minutes
    comparisons of estimators)."""

    budget: float
    units: str = "attn+ffn"
    estimator: str = "ste"
    lr: float = 2e-2
    w_lr_scale: float = 0.05
    dual_lr: float = 2.0
    rho: float = 0.0
    lam_max: float = 5.0
    steps: int = 10_000
    minutes: float | None = None
    seed: int = 0
    # "dense": every unit on; "static": from the best static unit drop (``static_start``). Measured on SmolLM2 at 0.75
    # (60 steps of 2 x 256): the static start (11 units off) began at KL 1.8-2.5, worse than whole-layer drop, and
    # the router first had to climb back to 0.96; it also costs 60 ablation passes (~200 s). So the default is dense.
    start: str = "dense"
    log: list[dict[str, float]] = field(default_factory=list)
    start_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise PonderError(f"--budget must be in (0, 1) for a router to save anything, got {self.budget}")
        if self.estimator not in ESTIMATORS:
            raise PonderError(f"unknown estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        if self.start not in ("static", "dense"):
            raise PonderError(f"unknown router start {self.start!r}; choose static or dense")
        if self.units not in ROUTER_UNITS:
            raise PonderError(f"unknown router units {self.units!r}; choose one of: {', '.join(ROUTER_UNITS)}")


def routed_cost(ga: torch.Tensor, gf: torch.Tensor, shares: tuple[float, float, float]) -> torch.Tensor:
    """Per token, the fraction of dense projection FLOPs its gates (L, B, T) spend: differentiable in the gates."""
    qo, kv, ffn = shares
    return (qo * ga + kv + ffn * gf).mean(0)


class Gates:
    """The gate function handed to the training forward: per layer the router's logits on the layer's input, turned
    into 0/1 gates by the estimator, and what the loss needs afterwards (the gates, their log-probabilities)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, units: str, estimator: str, tau: float,
                 gen: torch.Generator):
        self.w, self.b, self.units, self.est, self.tau, self.gen = w, b, units, estimator, tau, gen
        self.ga: list[torch.Tensor] = []
        self.gf: list[torch.Tensor] = []
        self.logp: list[torch.Tensor] = []

    def __call__(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = router_logits(x.detach(), self.w[i], self.b[i])  # (B, T, U): decisions read the state, not train it
        p = torch.sigmoid(z)
        if self.est == "ste":
            g = (z > 0).float() + p - p.detach()
        elif self.est == "gumbel":
            u = torch.rand(z.shape, generator=self.gen).clamp(1e-6, 1 - 1e-6)
            y = torch.sigmoid((z + torch.log(u) - torch.log1p(-u)) / self.tau)
            g = (y > 0.5).float() + y - y.detach()
        elif self.est == "soft":  # the relaxation itself: gates in (0, 1), sharpened as the temperature falls
            g = torch.sigmoid(z / self.tau)
        else:  # reinforce: sampled decisions; gradients only through their log-probabilities
            s = torch.bernoulli(p.detach(), generator=self.gen)
            self.logp.append((s * torch.log(p + 1e-9) + (1 - s) * torch.log1p(-p + 1e-9)).sum(-1))
            g = s
        ga, gf = (g[..., 0], g[..., 0]) if self.units == "layer" else (g[..., 0], g[..., 1])
        self.ga.append(ga)
        self.gf.append(gf)
        return ga.unsqueeze(-1).to(x.dtype), gf.unsqueeze(-1).to(x.dtype)


def unit_importance(engine: Engine, seqs: list[torch.Tensor], units: str) -> torch.Tensor:
    """(L, U): the KL to dense (nats/token) when each unit alone is skipped for every token of ``seqs`` (a few
    calibration sequences). Why: at the dense start the KL's gradient is zero (the student is the teacher), so a
    straight-through router gets no signal of which units matter until it has already skipped them; measured on
    SmolLM2, the first skips it made from a blind start cost KL ~1 at 5% of the FLOPs."""
    model = engine.model
    L, U = engine.cfg.num_hidden_layers, ROUTER_UNITS[units]
    ids = torch.stack(seqs).to(engine.device)
    one = torch.ones(ids.shape[0], ids.shape[1], 1)
    with torch.no_grad():
        tp = torch.log_softmax(model(ids).float(), -1)
        imp = torch.zeros(L, U)
        for i in range(L):
            for u in range(U):
                def gates(j, x, i=i, u=u):
                    if j != i:
                        return None, None
                    return (0 * one, 0 * one) if U == 1 else ((0 * one, one) if u == 0 else (one, 0 * one))
                lp = torch.log_softmax(model(ids, gates=gates).float(), -1)
                imp[i, u] = (tp.exp() * (tp - lp)).sum(-1).mean()
    return imp


def static_start(imp: torch.Tensor, budget: float, shares: tuple[float, float, float], units: str,
                 on: float = INIT_BIAS) -> tuple[torch.Tensor, float]:
    """Biases that start training from the best static unit drop: units skipped cheapest-first (KL per FLOP saved)
    until the fraction meets the budget get -``on``, the rest +``on``. Returns them and that fraction."""
    qo, kv, ffn = shares
    L, U = imp.shape
    save = torch.tensor([qo + ffn]) if U == 1 else torch.tensor([qo, ffn])
    cost = 1.0
    b = torch.full((L, U), on)
    for k in torch.argsort((imp / save).reshape(-1)).tolist():
        if cost <= budget:
            break
        i, u = divmod(k, U)
        b[i, u] = -on
        cost -= float(save[u]) / L
    return b, cost


def _ckpt_tensors(w, b, opt: torch.optim.Adam, meta: list[float]) -> dict[str, torch.Tensor]:
    st = opt.state
    out = {"w": w.detach(), "b": b.detach(), "meta": torch.tensor(meta, dtype=torch.float64)}
    for name, p in (("w", w), ("b", b)):
        if p in st:
            out[f"{name}.m"], out[f"{name}.v"] = st[p]["exp_avg"], st[p]["exp_avg_sq"]
            out[f"{name}.t"] = torch.as_tensor(st[p]["step"], dtype=torch.float64).reshape(1)
    return out


def train_router(engine: Engine, seqs: list[torch.Tensor], cfg: RouterTraining, batch: int = 8,
                 ckpt: Path | None = None, progress: bool = True) -> Router:
    """Train a router on ``seqs`` (equal-length token-id tensors), cycling through them in order; resumes from
    ``ckpt`` when it exists. Under torchrun each rank takes every world-th batch and gradients are averaged."""
    if getattr(engine, "quantised", False):
        raise PonderError("a router is trained through the float model; load it with weights='float32' (the "
                          "router then serves the native weights too: same fingerprint)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    model = engine.model
    for p in model.parameters():
        p.requires_grad_(False)
    L, D, U = engine.cfg.num_hidden_layers, engine.cfg.hidden_size, ROUTER_UNITS[cfg.units]
    w = torch.zeros(L, U, D, requires_grad=True)
    shares = unit_shares(engine)
    if cfg.start == "static" and not (ckpt is not None and ckpt.is_file()):
        imp = unit_importance(engine, seqs[:IMPORTANCE_SEQS], cfg.units)
        b0, f0 = static_start(imp, cfg.budget, shares, cfg.units)
        cfg.start_info = {"importance": [[round(float(v), 4) for v in r] for r in imp],
                          "static_fraction": round(f0, 4), "skipped_units": int((b0 < 0).sum())}
    else:
        b0, f0 = torch.full((L, U), INIT_BIAS), 1.0
    b = b0.clone().requires_grad_(True)
    # measured on SmolLM2 at 0.75 (40 steps): weights at 0.04x the biases' rate kept every token of a unit on the
    # same side (the fraction jumped 0.74 <-> 0.92, KL 1.0-1.7); at the same rate the decisions spread over tokens
    opt = torch.optim.Adam([{"params": [w], "lr": cfg.lr * cfg.w_lr_scale}, {"params": [b], "lr": cfg.lr}])
    lam, step, base, elapsed, last_c = 0.0, 0, 0.0, 0.0, f0
    if ckpt is not None and ckpt.is_file():
        st = load_file(str(ckpt))
        if tuple(st["w"].shape) == (L, U, D):
            with torch.no_grad():
                w.copy_(st["w"])
                b.copy_(st["b"])
            lam, stepf, base, elapsed, last_c = st["meta"].tolist()
            step = int(stepf)
            for name, p in (("w", w), ("b", b)):
                if f"{name}.m" in st:
                    opt.state[p] = {"exp_avg": st[f"{name}.m"], "exp_avg_sq": st[f"{name}.v"],
                                    "step": st[f"{name}.t"].reshape(())}
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    batches = [torch.stack(seqs[i:i + batch]) for i in range(0, len(seqs) - batch + 1, batch)]
    if not batches:
        raise PonderError(f"router training needs at least {batch} sequences, got {len(seqs)}")
    t0 = time.perf_counter() - elapsed
    limit = cfg.minutes * 60 if cfg.minutes else math.inf
    bar = tqdm(total=None if cfg.minutes else cfg.steps, initial=step, desc=f"router {cfg.estimator}", unit="step",
               file=sys.stderr, disable=not progress or rank != 0, dynamic_ncols=True)
    while step < cfg.steps and time.perf_counter() - t0 < limit:
        ids = batches[(step * world + rank) % len(batches)].to(engine.device)
        progress_ = min(1.0, max(step / max(1, cfg.steps), (time.perf_counter() - t0) / limit))
        tau = (1.0 - 0.5 * progress_) if cfg.estimator == "gumbel" else SOFT_TAU_END ** progress_
        opt.zero_grad()
        kls, costs = [], []
        pressure = max(0.0, min(cfg.lam_max, lam + cfg.rho * (last_c - cfg.budget)))
        for mb in ids.split(MICRO):  # micro-batches: a smaller working set is ~2x faster per token here
            with torch.no_grad():
                tp = torch.log_softmax(model(mb).float(), -1)
            g = Gates(w, b, cfg.units, cfg.estimator, tau, gen)
            # (bfloat16 for the routed pass only when BF16 is set: see there)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine.device.type == "cpu" and BF16):
                lp = torch.log_softmax(model(mb, gates=g).float(), -1)
            kl_tok = (tp.exp() * (tp - lp)).sum(-1)  # (b, T)
            cost_tok = routed_cost(torch.stack(g.ga), torch.stack(g.gf), shares)  # (b, T)
            cost = cost_tok.mean()
            if cfg.estimator == "reinforce":
                adv = (kl_tok + pressure * cost_tok).detach()
                m = float(adv.mean())
                base = m if step == 0 and not kls else 0.9 * base + 0.1 * m
                loss = ((adv - base) * torch.stack(g.logp).sum(0)).mean()
            else:
                loss = kl_tok.mean() + pressure * (cost - cfg.budget)
            (loss * mb.shape[0] / ids.shape[0]).backward()
            kls.append(float(kl_tok.detach().mean()))
            costs.append(float(cost.detach()))
        c = sum(costs) / len(costs)
        if world > 1:
            for t in (w.grad, b.grad):
                torch.distributed.all_reduce(t)
                t /= world
            ct = torch.tensor([c])
            torch.distributed.all_reduce(ct)
            c = float(ct) / world
        opt.step()
        lam = max(0.0, min(cfg.lam_max, lam + cfg.dual_lr * (c - cfg.budget)))  # (no wind-up)
        last_c = c
        step += 1
        kl = sum(kls) / len(kls)
        cfg.log.append({"step": step, "kl": kl, "fraction": c, "lambda": lam,
                        "seconds": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(kl=f"{kl:.3f}", budget=f"{c:.3f}", lam=f"{lam:.2f}")
        if ckpt is not None and rank == 0 and step % CKPT_EVERY == 0:
            save_file(_ckpt_tensors(w, b, opt, [lam, step, base, time.perf_counter() - t0, last_c]), str(ckpt))
    bar.close()
    return Router(w.detach().clone(), b.detach().clone(), cfg.units)


def heldout(engine: Engine, router_path: Path, budget: float, eval_tokens: int) -> dict[str, Any]:
    """The router as a user gets it (offset fitted on the calibration text) on the evaluation files: perplexity
    beside dense, and the realized fraction over 256-token windows with its spread."""
    pol = SkipRouter(budget=budget, router=str(router_path))
    pol.calibrate(engine, calibration_ids(engine))
    out: dict[str, Any] = {"offset": pol.calibration.get("threshold"),
                           "calibration_fraction": pol.calibration.get("calibration_fraction")}
    for name in ("code.txt", "prose.txt"):
        txt = repo_data(name).read_text()
        d = evaluate_text(engine, txt, None, max_tokens=eval_tokens)["perplexity"]
        r = evaluate_text(engine, txt, pol, max_tokens=eval_tokens)["perplexity"]
        ids = text_ids(engine, txt)[:eval_tokens]
        win = [ids[i:i + 256] for i in range(0, len(ids) - 255, 256)]
        out[name] = {"tokens": eval_tokens, "ppl_dense": round(d, 4), "ppl_router": round(r, 4),
                     "increase_pct": round(100 * (r / d - 1), 2), "realized": realized(engine, pol, win).summary()}
    return out


def run(model: str, out: Path, cfg: RouterTraining, tokens: int, chat: int, eval_tokens: int,
        progress: bool = True, batch: int = 4) -> dict[str, Any]:
    t0 = time.perf_counter()
    eng = load(model, weights="float32")  # trained on the float model (the native form shares its fingerprint)
    text, data, ids, n = training_ids(eng, model, tokens, SEQ * 8, "a router")
    seqs = list(torch.tensor(ids[:n]).view(-1, SEQ))
    gen = chat_generated(eng, text, calib_path().read_text(), chat, progress) if chat else []
    seqs += [torch.tensor(g) for g in gen if len(g) == SEQ]
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    seqs = [seqs[i] for i in order]  # code and chat mixed in every stretch of batches
    adapter, ckpt = adapter_paths(out)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    prep_s = time.perf_counter() - t0
    router = train_router(eng, seqs, cfg, batch=batch, ckpt=ckpt, progress=progress)
    train_s = cfg.log[-1]["seconds"] if cfg.log else 0.0
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    last = cfg.log[-10:]
    card = {"kind": "router", "base_model": str(model), "base_fingerprint": fingerprint(eng.model),
            "budget": cfg.budget, "units": cfg.units, "estimator": cfg.estimator,
            "method": "per layer a linear run-logit per unit on the RMS-normalised layer input; trained by KL "
                      "distillation of the frozen dense model with 0/1 gates, the budget an upper bound held by a "
                      "multiplier",
            "data": {**data, "tokens": n, "chat_generated_tokens": sum(len(g) for g in gen),
                     "excludes": "data/eval/* (held-out stdlib modules and articles)"},
            "training": {"steps": len(cfg.log) and int(cfg.log[-1]["step"]), "seconds": round(train_s, 1),
                         "minutes_total": None, "lr": cfg.lr, "w_lr_scale": cfg.w_lr_scale,
                         "dual_lr": cfg.dual_lr, "rho": cfg.rho, "lam_max": cfg.lam_max, "batch": batch,
                         "start": cfg.start, "start_info": cfg.start_info, "seq": SEQ,
                         "world": int(os.environ.get("WORLD_SIZE", "1")),
                         "final_kl": round(sum(r["kl"] for r in last) / max(1, len(last)), 4),
                         "final_fraction": round(sum(r["fraction"] for r in last) / max(1, len(last)), 4),
                         "data_prep_s": round(prep_s, 1)},
            "command": f"ponder train router --model {model} --budget {cfg.budget:g} --units {cfg.units} "
                       f"--estimator {cfg.estimator} --tokens {tokens} --chat {chat} --steps {cfg.steps} "
                       f"--batch {batch} --start {cfg.start}"
                       + (f" --minutes {cfg.minutes:g}" if cfg.minutes else ""),
            "machine": environment(eng.device, eng.dtype)}
    save_adapter(adapter, router.tensors(), card)
    card["heldout"] = heldout(eng, adapter, cfg.budget, eval_tokens)
    card["training"]["minutes_total"] = round((time.perf_counter() - t0) / 60, 2)
    save_adapter(adapter, router.tensors(), card)
    log = cfg.log[::max(1, len(cfg.log) // 200)]  # the training curve, thinned to ~200 points
    Path(str(adapter)[:-len(".safetensors")] + ".log.json").write_text(json.dumps(log) + "\n")
    ckpt.unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ponder train router", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=float, default=0.75, help="target fraction of dense per-token layer FLOPs")
    ap.add_argument("--units", default="attn+ffn", choices=tuple(ROUTER_UNITS),
                    help="attn+ffn: attention and FFN decided separately (MindSkip); layer: the whole layer")
    ap.add_argument("--estimator", default="soft", choices=ESTIMATORS,
                    help="soft (default: the best of the four in benchmarks/router_estimators.py), ste, gumbel, "
                         "reinforce")
    ap.add_argument("--tokens", type=int, default=196608, help="training tokens of the corpus (cycled)")
    ap.add_argument("--chat", type=int, default=8192, help="tokens of the model's own chat answers (0: none)")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps of --batch x 256 tokens")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (measured: 4 x more updates of 2 "
                                                         "sequences learned faster than steps of 8)")
    ap.add_argument("--start", default="dense", choices=("dense", "static"))
    ap.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    ap.add_argument("--lr", type=float, default=RouterTraining.lr,
                    help=f"the routers' biases (their weights: x{RouterTraining.w_lr_scale:g})")
    ap.add_argument("--dual-lr", type=float, default=RouterTraining.dual_lr, help="step of the budget multiplier")
    ap.add_argument("--rho", type=float, default=RouterTraining.rho,
                    help="weight of the last step's budget excess (damping)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per evaluation file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="adapter path without suffix (default adapters/<model>/router-<budget>)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = RouterTraining(a.budget, a.units, a.estimator, a.lr, dual_lr=a.dual_lr, rho=a.rho, steps=a.steps,
                         minutes=a.minutes, seed=a.seed, start=a.start)
    out = Path(a.out) if a.out else Path("adapters") / Path(str(a.model)).stem / f"router-{a.budget:g}"
    card = run(a.model, out, cfg, a.tokens, a.chat, a.eval_tokens, batch=a.batch)
    if not card:
        return 0
    h = card["heldout"]
    for name in ("code.txt", "prose.txt"):
        r = h[name]
        print(f"{name}: perplexity dense {r['ppl_dense']:.3f}, routed {r['ppl_router']:.3f} "
              f"({r['increase_pct']:+.1f}%) at realized {r['realized']['fraction']:.3f} "
              f"(std {r['realized']['std']:.3f})")
    print(f"wrote {out.parent / (out.name + '.safetensors')} and its card ({card['training']['minutes_total']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
