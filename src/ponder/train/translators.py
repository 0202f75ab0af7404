"""Exit translators (the tuned lens): per depth, a low-rank affine map so an early state decodes like the final one.

    ponder train translators [--model smollm2] [--tokens 49152] [--refine-tokens 24576] [--rank 64]
                             [--out adapters/<model>/translators]

Why. On a real model the state after ``d`` of ``L`` layers does not decode through the final norm and head
(SmolLM2: top-1 agreement with the final layer 0.03 after 12 of 30 layers), so every exit-based policy collapses.
A translator maps that state to where the final state would be: h + (h u) v + b, rank r, the identity at zero.

How, in two stages, both on the frozen base:
1. Closed form. The final norm discards scale, so the target is the final state's direction ``rms_normalize(h_L)``
   on the scale of ``h_d``; ridge regression of ``target - h_d`` on ``[h_d, 1]``, reduced to rank r (project the
   fitted values on their top-r principal directions). It needs only X'X and X'Y per depth, accumulated in float64
   over one dense pass: deterministic and cheap, and a good start (it lowers the exit KL from ~17 to ~5 nats).
2. Distillation on what matters, KL(final || exit) over the full vocabulary, one streaming pass with Adam, all
   depths at once, the head's products in bfloat16 (the CPU's matrix units make them 4.6x faster than float32).

Held-out evaluation (the evaluation files, never trained on): top-1 agreement with the final layer and KL per
depth, logit lens and translators side by side. Training text: ``data/calib.txt`` and the standard library's
non-held-out modules (``train/sources.py`` holds the evaluation modules out by name). Resumable: each stage
checkpoints after every batch (``<out>.partial.safetensors``, ``<out>.refine.safetensors``) and a rerun continues.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..api import load
from ..engine.forward import Engine
from ..engine.states import layer_states
from ..errors import PonderError
from ..eval.envinfo import environment
from ..eval.points import repo_data
from ..eval.report import svg
from ..models.adapters import Translators, fingerprint, save_adapter, translate
from ..models.llama import rms_norm
from ..policies.calibration import calib_path
from .sources import _unit_hash, default_stdlib_dir, is_heldout_module, list_stdlib_files

SEQ = 256
BATCH = 8


def training_text(n_chars: int) -> tuple[str, dict[str, Any]]:
    """The calibration text, then non-held-out stdlib modules in a fixed hash order, up to ``n_chars``."""
    parts = [calib_path().read_text()]
    root = default_stdlib_dir()
    files = [f for f in list_stdlib_files(root) if not is_heldout_module(f) and not f.startswith("encodings/")]
    files.sort(key=lambda f: _unit_hash("translators", f))
    used = []
    total = len(parts[0])
    for f in files:
        if total >= n_chars:
            break
        t = (root / f).read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        used.append(f)
        total += len(t)
    return "\n\n".join(parts), {"calib": calib_path().name, "stdlib_files": len(used), "chars": total}


def training_ids(engine: Engine, model: str, tokens: int, min_tokens: int, what: str
                 ) -> tuple[str, dict[str, Any], list[int], int]:
    """The training text (``training_text``), its first ``tokens`` ids and how many of them make whole ``SEQ``
    windows; refused with one line for a model without a tokenizer, a tokenizer that is not the model's, or too
    little text."""
    if engine.tokenizer is None:
        raise PonderError(f"{model} has no tokenizer; {what} is trained on text")
    text, data = training_text(tokens * 5)
    ids = engine.tokenizer.encode(text)[:tokens]
    if ids and max(ids) >= engine.cfg.vocab_size:
        raise PonderError(f"{model}'s tokenizer yields ids up to {max(ids)} but the model has "
                          f"{engine.cfg.vocab_size} embeddings; the tokenizer does not belong to this model")
    n = (len(ids) // SEQ) * SEQ
    if n < min_tokens:
        raise PonderError(f"only {len(ids)} training tokens found; at least {min_tokens} are needed")
    return text, data, ids, n


def _normalize(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def accumulate(engine: Engine, chunks: torch.Tensor, state: dict[str, torch.Tensor], ckpt: Path | None,
               progress: bool = True) -> dict[str, torch.Tensor]:
    """Sufficient statistics per depth d in [1, L): XtX (D+1, D+1), XtY (D+1, D) and the mean state RMS, float64,
    over ``chunks`` (n, SEQ); resumes from ``state["done"]`` chunks."""
    L, D = engine.cfg.num_hidden_layers, engine.cfg.hidden_size
    if not state:
        state = {"XtX": torch.zeros(L - 1, D + 1, D + 1, dtype=torch.float64),
                 "XtY": torch.zeros(L - 1, D + 1, D, dtype=torch.float64),
                 "rms": torch.zeros(L - 1, dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64),
                 "done": torch.zeros((), dtype=torch.long)}
    start = int(state["done"])
    bar = tqdm(total=len(chunks), initial=start, desc="translator statistics", unit="seq", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for b in range(start, len(chunks), BATCH):
            x = chunks[b:b + BATCH].to(engine.device)
            outs = layer_states(engine, x)
            fin = _normalize(outs[-1].reshape(-1, D).double())
            for d in range(1, L):
                h = outs[d - 1].reshape(-1, D).double()
                r = h.pow(2).mean(-1).sqrt()
                X = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
                Y = fin * r[:, None] - h  # the final direction on this state's scale, minus the identity part
                state["XtX"][d - 1] += X.T @ X
                state["XtY"][d - 1] += X.T @ Y
                state["rms"][d - 1] += r.sum()
            state["n"] += x.numel()
            state["done"] = torch.tensor(min(b + BATCH, len(chunks)))
            if ckpt is not None:
                save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
            bar.update(x.shape[0])
    bar.close()
    return state


def solve(state: dict[str, torch.Tensor], rank: int, ridge: float) -> dict[int, tuple[torch.Tensor, ...]]:
    """Ridge regression per depth, then reduced to ``rank`` along the fitted values' principal directions."""
    maps = {}
    n = float(state["n"])
    for j in range(state["XtX"].shape[0]):
        A, C = state["XtX"][j] / n, state["XtY"][j] / n
        D = C.shape[1]
        lam = ridge * float(torch.diagonal(A)[:D].mean())
        Bf = torch.linalg.solve(A + lam * torch.eye(D + 1, dtype=A.dtype), C)  # (D+1, D)
        fitted_cov = Bf.T @ A @ Bf  # covariance of the fitted residuals X Bf
        _, vecs = torch.linalg.eigh(fitted_cov)
        V = vecs[:, -rank:]  # (D, r): top-r directions
        u = Bf[:D] @ V
        b = Bf[D] @ V @ V.T
        maps[j + 1] = (u.float(), V.T.contiguous().float(), b.float())
    return maps


def refine(engine: Engine, tr: Translators, chunks: torch.Tensor, ckpt: Path | None, lr: float, micro: int = 256,
           progress: bool = True) -> Translators:
    """Distil every depth's map on KL(final || exit) over the full vocabulary, from the closed-form start, streaming
    ``chunks`` once (fresh tokens every step). The head's products run in bfloat16 (4.6x faster here than float32
    on this CPU's matrix units); the maps and their optimiser stay float32. Checkpointed after every chunk batch."""
    D = engine.cfg.hidden_size
    depths = sorted(tr.maps)
    params = {d: [t.detach().clone().float().requires_grad_() for t in tr.maps[d]] for d in depths}
    opt = torch.optim.Adam([t for d in depths for t in params[d]], lr=lr)
    done = 0
    if ckpt is not None and ckpt.is_file():
        st = load_file(str(ckpt))
        done = int(st.pop("done"))
        for d in depths:
            for k, t in zip("uvb", params[d]):
                t.data.copy_(st[f"t{d}.{k}"])
        opt_state = {k[4:]: v for k, v in st.items() if k.startswith("opt.")}
        if opt_state:
            for j, t in enumerate(t for d in depths for t in params[d]):
                opt.state[t] = {"step": opt_state[f"{j}.step"], "exp_avg": opt_state[f"{j}.m"],
                                "exp_avg_sq": opt_state[f"{j}.v"]}
    head = engine.head.detach().to(torch.bfloat16)
    norm, eps = engine.norm.detach().float(), engine.cfg.rms_norm_eps

    def logp(h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(rms_norm(h, norm, eps).to(torch.bfloat16), head).float(), -1)

    bar = tqdm(total=len(chunks), initial=done, desc="translator distillation", unit="seq", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for b in range(done, len(chunks), BATCH):
        with torch.inference_mode():
            outs = layer_states(engine, chunks[b:b + BATCH].to(engine.device))
        states = [o.reshape(-1, D).float().clone() for o in outs]  # out of inference mode: autograd may save them
        n = states[0].shape[0]
        for m in range(0, n, micro):
            with torch.no_grad():
                tp = logp(states[-1][m:m + micro])
                p = tp.exp()
            loss = 0.0
            for d in depths:
                h = states[d - 1][m:m + micro]
                u, v, bb = params[d]
                loss = loss + (p * (tp - logp(translate(h, u, v, bb)))).sum(-1).mean()
            opt.zero_grad()
            (loss / len(depths)).backward()
            opt.step()
        bar.update(min(BATCH, len(chunks) - b))
        bar.set_postfix(kl=f"{float(loss.detach()) / len(depths):.3f}")
        if ckpt is not None:
            st = {f"t{d}.{k}": t.detach().contiguous() for d in depths for k, t in zip("uvb", params[d])}
            for j, t in enumerate(t for d in depths for t in params[d]):
                s_ = opt.state.get(t)
                if s_:
                    st[f"opt.{j}.step"] = torch.as_tensor(s_["step"]).float()
                    st[f"opt.{j}.m"], st[f"opt.{j}.v"] = s_["exp_avg"], s_["exp_avg_sq"]
            st["done"] = torch.tensor(min(b + BATCH, len(chunks)))
            save_file(st, str(ckpt))
    bar.close()
    return Translators({d: tuple(t.detach() for t in params[d]) for d in depths}, tr.card)


@torch.inference_mode()
def evaluate(engine: Engine, tr: Translators, ids: list[int], depths: list[int]) -> list[dict[str, float]]:
    """Per depth: top-1 agreement with the final layer and KL(final || exit) in nats, lens and translator."""
    D = engine.cfg.hidden_size
    n = (len(ids) // SEQ) * SEQ
    x = torch.tensor(ids[:n]).view(-1, SEQ)
    acc = {d: [0.0, 0.0, 0.0, 0.0] for d in depths}
    count = 0
    for b in range(0, x.shape[0], 4):
        xb = x[b:b + 4].to(engine.device)
        outs = layer_states(engine, xb)
        fin = torch.log_softmax(engine.logits(outs[-1].reshape(-1, D)).float(), -1)
        top = fin.argmax(-1)
        pf = fin.exp()
        for d in depths:
            h = outs[d - 1].reshape(-1, D)
            for k, hh in enumerate((h, tr(d, h))):
                lp = torch.log_softmax(engine.logits(hh).float(), -1)
                acc[d][2 * k] += float((lp.argmax(-1) == top).sum())
                acc[d][2 * k + 1] += float((pf * (fin - lp)).sum())
        count += xb.numel()
    return [{"depth": d, "lens_top1": round(a[0] / count, 4), "lens_kl": round(a[1] / count, 4),
             "translator_top1": round(a[2] / count, 4), "translator_kl": round(a[3] / count, 4)}
            for d, a in acc.items()]


def write_lens_plots(card: dict[str, Any], out: Path) -> list[Path]:
    """``<out>-top1.svg`` and ``<out>-kl.svg``: per depth, logit lens against translators on each held-out file (the
    picture tuned-lens users read first)."""
    names = [f"{kind} {f.removesuffix('.txt')}" for f in card["heldout"] for kind in ("lens", "translators")]
    col, mk = svg.colours(names), svg.markers(names)
    paths = []
    for key, label, scale in (("top1", "top-1 agreement with the final layer", "linear"),
                              ("kl", "KL(final || exit), nats", "log")):
        series = []
        for f, rows in card["heldout"].items():
            for kind, field_ in (("lens", f"lens_{key}"), ("translators", f"translator_{key}")):
                n = f"{kind} {f.removesuffix('.txt')}"
                series.append(svg.Series(n, [svg.Pt(r["depth"], max(r[field_], 1e-3), f"{n}, depth {r['depth']}: "
                                                    f"{r[field_]:.3f}") for r in rows], col[n], mk[n],
                                         hollow=kind == "lens"))
        ch = svg.Chart(f"{card['base_model']}: exits decoded by the logit lens and by the trained translators",
                       svg.Axis("layers run (exit depth)"), svg.Axis(label, scale=scale), series,
                       note=f"held-out evaluation files; translators rank {card['rank']}, {card['data']['tokens']} "
                            "training tokens")
        p = out.parent / f"{out.name}-{key}.svg"
        p.write_text(svg.render(ch))
        paths.append(p)
    return paths


def train_translators(model: str, out: Path, tokens: int, rank: int, ridge: float, eval_tokens: int,
                      refine_tokens: int = 24576, lr: float = 1e-3, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    eng = load(model, weights="float32")  # trained against the float model (the native form shares its fingerprint)
    L, D = eng.cfg.num_hidden_layers, eng.cfg.hidden_size
    if not 1 <= rank <= D:
        raise PonderError(f"--rank must be in [1, {D}] for this model, got {rank}")
    _, data, ids, n = training_ids(eng, model, tokens, SEQ * BATCH, "a translator")
    chunks = torch.tensor(ids[:n]).view(-1, SEQ)
    out = Path(out).with_suffix("")
    ckpt = out.parent / (out.name + ".partial.safetensors")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    if ckpt.is_file():
        state = load_file(str(ckpt))
        if state["XtX"].shape[1] != D + 1:
            state = {}
    state = accumulate(eng, chunks, state, ckpt, progress)
    stats_s = time.perf_counter() - t0
    tr = Translators(solve(state, rank, ridge))
    n_refine = min(refine_tokens // SEQ, chunks.shape[0])
    if n_refine:
        # the distillation reads the same training text (its first refine_tokens), from the closed-form start
        tr = refine(eng, tr, chunks[:n_refine], out.parent / (out.name + ".refine.safetensors"), lr, progress=progress)
    refine_s = time.perf_counter() - t0 - stats_s
    # stored in float16 (half the file; the maps are small corrections), evaluated as stored
    tr = tr.to(torch.float16, "cpu").to(eng.dtype, eng.device)
    held = {}
    depths = list(range(1, L))
    for name in ("code.txt", "prose.txt"):
        ev = eng.tokenizer.encode(repo_data(name).read_text())[:eval_tokens]
        held[name] = evaluate(eng, tr, ev, depths)
    card = {"kind": "translators", "base_model": str(model), "base_fingerprint": fingerprint(eng.model),
            "method": "tuned lens: closed-form start (ridge regression of (final direction on the state's scale - "
                      "state) on [state, 1] per depth, reduced to rank r), then distilled on KL(final || exit) over "
                      "the full vocabulary (Adam, one pass over refine_tokens)",
            "rank": rank, "ridge": ridge, "depths": depths, "refine_tokens": n_refine * SEQ, "lr": lr,
            "stored_dtype": "float16",
            "data": {**data, "tokens": n, "excludes": "data/eval/* (held-out stdlib modules and articles)"},
            "training": {"minutes": round((time.perf_counter() - t0) / 60, 2), "statistics_s": round(stats_s, 1),
                         "distillation_s": round(refine_s, 1), "tokens": n,
                         "distillation_steps": -(-n_refine * SEQ // 256)},
            "command": f"ponder train translators --model {model} --tokens {tokens} --rank {rank} --ridge {ridge} "
                       f"--refine-tokens {refine_tokens} --lr {lr}",
            "machine": environment(eng.device, eng.dtype), "heldout": held}
    save_adapter(out.with_suffix(".safetensors"), tr.to(torch.float16, "cpu").tensors(), card)
    write_lens_plots(card, out)
    ckpt.unlink(missing_ok=True)
    (out.parent / (out.name + ".refine.safetensors")).unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ponder train translators", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=49152, help="training tokens")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean input variance")
    ap.add_argument("--refine-tokens", type=int, default=24576, help="tokens of KL distillation (0: closed form only)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens per evaluation file")
    ap.add_argument("--out", default=None, help="adapter path without suffix (default adapters/<model>/translators)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else Path("adapters") / Path(str(a.model)).stem / "translators"
    card = train_translators(a.model, out, a.tokens, a.rank, a.ridge, a.eval_tokens, a.refine_tokens, a.lr)
    for name, rows in card["heldout"].items():
        print(f"{name}: depth  lens top1 / KL   translator top1 / KL")
        for r in rows:
            print(f"  {r['depth']:>3}  {r['lens_top1']:.3f} / {r['lens_kl']:6.2f}   "
                  f"{r['translator_top1']:.3f} / {r['translator_kl']:6.2f}")
    print(f"wrote {out.with_suffix('.safetensors')} and its card ({card['training']['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

