"""Healed layer drop: a trained low-rank stand-in for each dropped layer, fitted on the frozen base.

    ponder train layer-heal [--model smollm2] [--budget 0.75] [--rank 64] [--tokens 49152] [--chat 8192]
                            [--refine-tokens 24576] [--out adapters/<model>/layer-heal-<budget>]

Why. Dropping whole layers is the simplest real saving, but on a real model a dropped layer's residual update is not
negligible (SmolLM2 at budget 0.75: +278% perplexity unhealed). The layer-pruning papers heal the remaining layers
with a short distillation of low-rank adapters; that changes every remaining layer's weights, which on native
quantised weights would mean re-quantising them. ponder heals instead where the work was removed, as ReplaceMe and
LLM-Streamline do: each dropped layer is replaced by a low-rank affine map of its input, (h u) v + b, costing
2 D r + 2 r D FLOPs per token (rank 64 on SmolLM2: 4% of a layer) and leaving the remaining layers, in whatever
weight form, untouched.

How. The dropped set is layer-drop's own (least important first, on the calibration text), so the healed row and
the plain row drop the same layers. The maps are fitted in order, shallow first, each on the *healed* model's own
input to that layer (the earlier drops already replaced): the target is the dense model's state after the layer
minus that input, so a map also corrects the drift the earlier drops left. Ridge regression on [h, 1] from float64
sufficient statistics, reduced to rank r along the fitted values' principal directions (the same closed form as the
exit translators). One layer sweep over all training chunks (two forward passes in all); resumable (each solved
layer is checkpointed in ``<out>.partial.safetensors``). Then, as the translators' second stage does, the maps are
distilled end to end on KL(dense || healed) through the frozen remaining layers (``refine``). Measured on `ref`: the
closed form needs data (8k tokens made the held-out drop worse, 32k better), so the default is 49k.

Held-out evaluation (the evaluation files, never trained on): perplexity of dense, the plain drop and the healed drop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..api import load
from ..engine.forward import Engine
from ..errors import PonderError
from ..eval.envinfo import environment
from ..eval.metrics import evaluate_text
from ..eval.points import repo_data
from ..models.adapters import LayerReplacement, adapter_paths, fingerprint, save_adapter
from ..policies.calibration import calib_path, calibration_ids
from ..policies.layer_drop import LayerDrop
from .draft import chat_generated
from .translators import SEQ, solve, training_ids

BATCH = 8


def _layer(engine: Engine, ids: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    """Layer ``i`` alone on states ``x`` of token ids ``ids`` (its own fresh cache: attention within the chunk)."""
    cache = engine.new_cache(*ids.shape)
    cache.reserve(ids.shape[1])
    return engine.forward(ids, cache, None, None, logits=None, first_layer=i, last_layer=i + 1, hidden=x).hidden


def fit(engine: Engine, chunks: list[torch.Tensor], dropped: list[int], rank: int, ridge: float,
        reps: dict[int, LayerReplacement], ckpt: Path | None, progress: bool = True) -> dict[int, LayerReplacement]:
    """A layer sweep over all training chunks at once: the dense states and the healed model's states advance one
    layer at a time (the healed ones through each replacement as soon as it is solved), so the whole fit costs two
    forward passes however many layers are dropped. ``chunks``: token-id sequences of any lengths; ``reps``: layers
    already solved (a resumed run)."""
    L, D = engine.cfg.num_hidden_layers, engine.cfg.hidden_size
    with torch.inference_mode():
        dense = [engine.embedding(c[None])[0] for c in chunks]  # per chunk (SEQ, D)
        healed = [d.clone() for d in dense]
        bar = tqdm(total=L, desc="heal sweep", unit="layer", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        for i in range(L):
            for c in range(len(chunks)):
                dense[c] = _layer(engine, chunks[c][None], dense[c][None], i)[0]
            if i in dropped:
                if i not in reps:
                    XtX = torch.zeros(D + 1, D + 1, dtype=torch.float64)
                    XtY = torch.zeros(D + 1, D, dtype=torch.float64)
                    for h, t in zip(healed, dense):
                        X = torch.cat([h.double(), torch.ones(h.shape[0], 1, dtype=torch.float64)], 1)
                        XtX += X.T @ X
                        XtY += X.T @ (t.double() - h.double())
                    rows = float(sum(len(c) for c in chunks))
                    st = {"XtX": XtX[None], "XtY": XtY[None], "n": torch.tensor(rows, dtype=torch.float64)}
                    u, v, b = solve(st, rank, ridge)[1]
                    reps[i] = LayerReplacement(u.to(engine.dtype), v.to(engine.dtype), b.to(engine.dtype))
                    if ckpt is not None:
                        save_file({f"l{j}.{k}": getattr(r, k).contiguous() for j, r in reps.items() for k in "uvb"},
                                  str(ckpt))
                healed = [h + reps[i](h) for h in healed]
            else:
                healed = [_layer(engine, chunks[c][None], healed[c][None], i)[0] for c in range(len(chunks))]
            bar.update(1)
        bar.close()
    return reps


def refine(engine: Engine, chunks: list[torch.Tensor], reps: dict[int, LayerReplacement], tokens: int, lr: float,
           progress: bool = True) -> dict[int, LayerReplacement]:
    """Distil the stand-ins end to end, from the closed-form start: KL(dense || healed) over the full vocabulary,
    back-propagated through the remaining (frozen) layers into the maps only, one streaming pass over ``tokens``
    tokens of the training sequences (Adam). Why: the closed form matches each state in squared error, dominated by
    a few large residual dimensions; the loss that matters is the next-token distribution."""
    params = {i: [getattr(r, k).detach().clone().float().requires_grad_() for k in "uvb"] for i, r in reps.items()}
    opt = torch.optim.Adam([t for ps in params.values() for t in ps], lr=lr)
    model = engine.model
    seqs = [c for c in chunks if len(c) == SEQ][: max(1, tokens // SEQ)]
    bar = tqdm(total=len(seqs), desc="heal distillation", unit="seq", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    fns = {i: (lambda h, p=p: (h @ p[0]) @ p[1] + p[2]) for i, p in params.items()}
    for b in range(0, len(seqs), BATCH):
        ids = torch.stack(seqs[b:b + BATCH]).to(engine.device)
        with torch.no_grad():
            tp = torch.log_softmax(model(ids).float(), -1)
        lp = torch.log_softmax(model(ids, replace=fns).float(), -1)
        loss = (tp.exp() * (tp - lp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(ids.shape[0])
        bar.set_postfix(kl=f"{float(loss.detach()):.3f}")
    bar.close()
    return {i: LayerReplacement(*(t.detach().to(engine.dtype) for t in ps)) for i, ps in params.items()}


def train_heal(model: str, out: Path, budget: float, rank: int, ridge: float, tokens: int, eval_tokens: int,
               chat: int = 0, progress: bool = True, refine_tokens: int = 0, lr: float = 1e-3) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not 0.0 < budget < 1.0:
        raise PonderError(f"--budget must be in (0, 1) for a layer drop to heal, got {budget}")
    eng = load(model, weights="float32")  # fitted on the float model (the native form shares its fingerprint)
    D = eng.cfg.hidden_size
    if not 1 <= rank <= D:
        raise PonderError(f"--rank must be in [1, {D}] for this model, got {rank}")
    drop = LayerDrop(budget=budget)
    drop.calibrate(eng, calibration_ids(eng))
    dropped = list(drop.dropped or [])
    if not dropped:
        raise PonderError(f"budget {budget} drops no layer of this {eng.cfg.num_hidden_layers}-layer model: nothing "
                          "to heal")
    text, data, ids, n = training_ids(eng, model, tokens, SEQ * BATCH, "a layer heal")
    chunks = list(torch.tensor(ids[:n]).view(-1, SEQ))
    # The training text is code; the model's own answers to chat requests built from it add English (measured at
    # budget 0.9 without them: held-out code +51.6% -> +27.5%, prose only +55% -> +50%).
    gen = chat_generated(eng, text, calib_path().read_text(), chat, progress) if chat else []
    chunks += [torch.tensor(g) for g in gen]
    adapter, ckpt = adapter_paths(out)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    reps: dict[int, LayerReplacement] = {}
    if ckpt.is_file():  # resume: the layers solved before the interruption
        st = load_file(str(ckpt))
        for i in sorted({int(k.split(".")[0][1:]) for k in st}):
            if i in dropped and st[f"l{i}.u"].shape == (D, rank):
                reps[i] = LayerReplacement(*(st[f"l{i}.{k}"] for k in "uvb"))
    reps = fit(eng, chunks, dropped, rank, ridge, reps, ckpt, progress)
    fit_s = time.perf_counter() - t0
    if refine_tokens:
        reps = refine(eng, chunks, reps, refine_tokens, lr, progress)
    refine_s = time.perf_counter() - t0 - fit_s
    # stored in float16 (half the file), evaluated as stored
    reps = {i: LayerReplacement(*(getattr(r, k).half().to(eng.dtype) for k in "uvb")) for i, r in reps.items()}
    plain = LayerDrop(budget=budget, dropped=dropped)
    healed = LayerDrop(budget=budget, dropped=dropped)
    healed.replacements = reps
    held = {}
    for name in ("code.txt", "prose.txt"):
        txt = repo_data(name).read_text()
        r = {k: evaluate_text(eng, txt, pol, max_tokens=eval_tokens)["perplexity"]
             for k, pol in (("dense", None), ("plain", plain), ("healed", healed))}
        held[name] = {"tokens": eval_tokens, "ppl_dense": round(r["dense"], 4),
                      "ppl_plain_drop": round(r["plain"], 4), "ppl_healed_drop": round(r["healed"], 4),
                      "increase_plain_pct": round(100 * (r["plain"] / r["dense"] - 1), 2),
                      "increase_healed_pct": round(100 * (r["healed"] / r["dense"] - 1), 2)}
    card = {"kind": "layer-heal", "base_model": str(model), "base_fingerprint": fingerprint(eng.model),
            "budget": budget, "dropped": dropped, "rank": rank, "ridge": ridge,
            "method": "per dropped layer (layer-drop's ranking), a low-rank affine replacement (h u) v + b of its "
                      "input, fitted shallow-first on the healed model's own inputs to the dense model's state after "
                      "the layer (ridge on [h, 1], reduced to rank r); the remaining layers are untouched",
            "stored_dtype": "float16",
            "data": {**data, "tokens": n, "chat_generated_tokens": sum(len(g) for g in gen),
                     "excludes": "data/eval/* (held-out stdlib modules and articles)"},
            "training": {"minutes": round((time.perf_counter() - t0) / 60, 2), "fit_s": round(fit_s, 1), "tokens": n,
                         "forward_passes": 2, "distillation_s": round(refine_s, 1),
                         "distillation_tokens": min(refine_tokens, n) if refine_tokens else 0, "lr": lr},
            "command": f"ponder train layer-heal --model {model} --budget {budget:g} --rank {rank} --ridge {ridge} "
                       f"--tokens {tokens} --chat {chat} --refine-tokens {refine_tokens} --lr {lr}",
            "machine": environment(eng.device, eng.dtype), "heldout": held}
    save_adapter(adapter,
                 {f"l{i}.{k}": getattr(r, k).half().contiguous() for i, r in reps.items() for k in "uvb"}, card)
    ckpt.unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ponder train layer-heal", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=float, default=0.75, help="the layer-drop budget to heal (the dropped set)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean input variance")
    ap.add_argument("--tokens", type=int, default=49152, help="training tokens")
    ap.add_argument("--chat", type=int, default=8192, help="tokens of the model's own chat answers (0: none)")
    ap.add_argument("--refine-tokens", type=int, default=24576,
                    help="tokens of end-to-end KL distillation after the closed form (0: closed form only)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per evaluation file")
    ap.add_argument("--out", default=None, help="adapter path without suffix (default "
                                                "adapters/<model>/layer-heal-<budget>)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else Path("adapters") / Path(str(a.model)).stem / f"layer-heal-{a.budget:g}"
    card = train_heal(a.model, out, a.budget, a.rank, a.ridge, a.tokens, a.eval_tokens, a.chat,
                      refine_tokens=a.refine_tokens, lr=a.lr)
    print(f"dropped layers {card['dropped']}")
    for name, r in card["heldout"].items():
        print(f"{name}: perplexity dense {r['ppl_dense']:.3f}, plain drop {r['ppl_plain_drop']:.3f} "
              f"({r['increase_plain_pct']:+.1f}%), healed {r['ppl_healed_drop']:.3f} "
              f"({r['increase_healed_pct']:+.1f}%)")
    print(f"wrote {out.parent / (out.name + '.safetensors')} and its card ({card['training']['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
