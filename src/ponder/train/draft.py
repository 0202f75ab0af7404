"""A draft head for lossless speculation: predicts the model's next final feature, and so its next token.

    ponder train draft-head [--model smollm2] [--tokens 196608] [--generated 16384] [--chat 16384] [--vocab 8192]
                            [--epochs 8]
                            [--out adapters/<model>/draft-head]

Why this shape. On SmolLM2 a draft that runs early layers costs half a forward before it proposes anything (and its
states do not decode through the head); a draft on the *final* features costs almost nothing: EAGLE's observation
is that the next final feature is predictable from the current one and the token just chosen. The module
(``models.adapters.DraftHead``) is f' = f + W2 silu(W1 [norm(f); embed(x)] + b1), followed by the model's final norm
and its LM head restricted to the ``--vocab`` tokens the model emits most (FR-Spec: the tied 49k-token head is a
fifth of the model; a few thousand rows carry nearly all its greedy choices). It is trained on the frozen model's own
features: teacher-forced over training text (``train.translators.training_text``: calibration text and non-held-out
stdlib modules, never the evaluation files) and over the model's own greedy continuations of prompts cut from that
text and to chat requests built from it (self-distillation: at run time the draft continues the model's choices, not
a corpus's). Loss, per position:
cross-entropy of the reduced head against the model's greedy next token, plus a smooth-L1 feature regression, over a
three-step unroll (later steps start from the draft's own predicted feature, as they do when chained).

The card reports the held-out greedy acceptance by draft position (teacher-forced chains on the evaluation files),
the vocabulary's coverage, and what training cost. Resumable: the feature set and each epoch are checkpointed.
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
from ..engine.generate import SamplingConfig, generate
from ..errors import PonderError
from ..eval.envinfo import environment
from ..eval.points import repo_data
from ..eval.prompts import chat_requests
from ..models.adapters import DraftHead, draft_feature, fingerprint, save_adapter
from ..models.gguf_tokenizer import render_chat
from ..models.llama import rms_norm
from ..policies.calibration import calib_path
from .translators import SEQ, training_ids

GEN_PROMPT, GEN_NEW, GEN_BATCH = 48, 80, 16
UNROLL = 3  # chained steps per training position: drafts are chained at run time


@torch.inference_mode()
def features(engine: Engine, seqs: list[list[int]], batch: int = 8, progress: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For equal-length token sequences (n, T): the final states (n, T, D), the model's greedy next token at every
    position (n, T) and the ids (n, T)."""
    ids = torch.tensor(seqs)
    fs, ys = [], []
    for b in tqdm(range(0, len(seqs), batch), desc="draft features", unit="batch", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True):
        o = engine.forward(ids[b:b + batch].to(engine.device), logits=None, phase="score")
        fs.append(o.hidden.float().cpu())
        ys.append(engine.logits(o.hidden).argmax(-1).cpu())
    return torch.cat(fs), torch.cat(ys), ids


@torch.inference_mode()
def self_generated(engine: Engine, ids: list[int], n_tokens: int, progress: bool = True) -> list[list[int]]:
    """The model's greedy continuations (prompt + GEN_NEW tokens) of prompts cut from ``ids``, ~n_tokens new."""
    n = max(0, n_tokens // GEN_NEW)
    step = max(GEN_PROMPT, len(ids) // max(n, 1))
    prompts = [ids[i:i + GEN_PROMPT] for i in range(0, len(ids) - GEN_PROMPT, step)][:n]
    sc = SamplingConfig(max_new_tokens=GEN_NEW, temperature=0.0, stop_tokens=())
    out = []
    for b in tqdm(range(0, len(prompts), GEN_BATCH), desc="self-generated text", unit="batch", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True):
        chunk = prompts[b:b + GEN_BATCH]
        res = generate(engine, chunk, sc)
        out += [p + t for p, t in zip(chunk, res.tokens)]
    return [s for s in out if len(s) == GEN_PROMPT + GEN_NEW]


@torch.inference_mode()
def chat_generated(engine: Engine, code: str, prose: str, n_tokens: int, progress: bool = True) -> list[list[int]]:
    """The model's greedy answers (GEN_NEW tokens) to chat requests built from training text, rendered with its chat
    template; each kept as the prompt's last GEN_PROMPT tokens and the answer. [] without a chat template."""
    if not engine.chat_template or n_tokens <= 0:
        return []
    reqs = chat_requests(code, prose, n_tokens // GEN_NEW)
    prompts = [engine.tokenizer.encode(render_chat(engine.chat_template, r["messages"]))[-512:] for r in reqs]
    sc = SamplingConfig(max_new_tokens=GEN_NEW, temperature=0.0, stop_tokens=())
    out = []
    for b in tqdm(range(0, len(prompts), GEN_BATCH), desc="self-generated chat", unit="batch", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True):
        chunk = prompts[b:b + GEN_BATCH]
        res = generate(engine, chunk, sc)
        out += [p[-GEN_PROMPT:] + t for p, t in zip(chunk, res.tokens) if len(t) == GEN_NEW and len(p) >= GEN_PROMPT]
    return out


class _Module(torch.nn.Module):
    def __init__(self, D: int, H: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(H, 2 * D) * (2 * D) ** -0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(H))
        self.w2 = torch.nn.Parameter(torch.zeros(D, H))  # starts as "the feature does not change"

    def forward(self, f, e, norm, eps):
        return draft_feature(f, e, self.w1, self.b1, self.w2, norm, eps)


def train_head(engine: Engine, feats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], vocab: torch.Tensor,
               hidden: int, epochs: int, lr: float, ckpt: Path | None, batch: int = 256, seed: int = 0,
               progress: bool = True) -> tuple[_Module, list[float]]:
    """Adam over (f_t, x_{t+1}) -> (f_{t+1}, y_{t+1}) and ``UNROLL - 1`` chained steps from the module's own
    predicted features; returns the module and the mean loss of each epoch."""
    torch.manual_seed(seed)
    D, V = engine.cfg.hidden_size, engine.cfg.vocab_size
    eps = engine.cfg.rms_norm_eps
    norm, embed = engine.norm.detach().float(), engine.embed.detach().float()
    head = engine.head.detach().float()[vocab]
    to_r = torch.full((V,), -100, dtype=torch.long)
    to_r[vocab] = torch.arange(vocab.numel())
    # flat training starts over positions t with t + UNROLL < T, per feature set
    F_all = torch.cat([f.reshape(-1, D) for f, _, _ in feats])
    Y_all = to_r[torch.cat([y.reshape(-1) for _, y, _ in feats])]
    X_all = torch.cat([x.reshape(-1) for _, _, x in feats])
    starts, off = [], 0
    for f, _, _ in feats:
        n, T = f.shape[:2]
        t = torch.arange(T - UNROLL)
        starts.append((off + torch.arange(n)[:, None] * T + t[None]).reshape(-1))
        off += n * T
    starts = torch.cat(starts)
    scale = float(F_all.pow(2).mean().sqrt())
    mod = _Module(D, hidden)
    opt = torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=0.01)
    first, losses = 0, []
    if ckpt is not None and ckpt.is_file():
        st = load_file(str(ckpt))
        mod.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("mod.")})
        first, losses = int(st["epoch"]), st["losses"].tolist()
    for ep in range(first, epochs):
        perm = starts[torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(seed + ep))]
        tot, cnt = 0.0, 0
        bar = tqdm(range(0, perm.numel(), batch), desc=f"draft head epoch {ep + 1}/{epochs}", unit="step",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True)
        for s in bar:
            i = perm[s:s + batch]
            f = F_all[i]
            loss = 0.0
            for j in range(1, UNROLL + 1):  # every step after the first starts from the previous predicted feature
                f = mod(f, embed[X_all[i + j]], norm, eps)
                lg = F.linear(rms_norm(f, norm, eps), head)
                loss = loss + F.cross_entropy(lg, Y_all[i + j], ignore_index=-100) \
                    + F.smooth_l1_loss(f / scale, F_all[i + j] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * i.numel()
            cnt += i.numel()
            bar.set_postfix(loss=f"{tot / cnt:.3f}")
        losses.append(tot / cnt)
        if ckpt is not None:
            save_file({**{f"mod.{k}": v.detach().contiguous() for k, v in mod.state_dict().items()},
                       "epoch": torch.tensor(ep + 1), "losses": torch.tensor(losses)}, str(ckpt))
    return mod, losses


def as_draft_head(engine: Engine, mod: _Module, vocab: torch.Tensor, card: dict[str, Any]) -> DraftHead:
    return DraftHead.on(mod.w1.detach(), mod.b1.detach(), mod.w2.detach(), vocab, engine.embed, engine.norm,
                        engine.head, engine.cfg.rms_norm_eps, card)


@torch.inference_mode()
def chain_acceptance(engine: Engine, dh: DraftHead, ids: list[int], k: int) -> list[float]:
    """Held-out greedy acceptance by draft position: from every position's true final feature, chain ``k`` drafts
    and count how many in a row equal the model's own greedy tokens (teacher-forced: the chain's tokens are the
    drafts, the reference is the model's greedy continuation of the true text, which is what verification checks
    whenever the drafts so far were accepted)."""
    n = (len(ids) // SEQ) * SEQ
    f, y, x = features(engine, [ids[i:i + SEQ] for i in range(0, n, SEQ)], progress=False)
    D = f.shape[-1]
    # reference greedy continuation from position t: y[t], then the model's own next greedy tokens... which are only
    # known along the true text where the text's token equals the greedy token; so a chain position j is scored only
    # while the text followed the model's greedy choice (x[t+1..t+j] == y[t..t+j-1]).
    ok = torch.zeros(k)
    tried = torch.zeros(k)
    fr = f.reshape(-1, SEQ, D)
    for r in range(fr.shape[0]):
        fe, yy, xx = fr[r].to(engine.device), y.view(-1, SEQ)[r], x.view(-1, SEQ)[r]
        feat, tok = fe[: SEQ - k - 1], yy[: SEQ - k - 1].to(engine.device)  # draft input: f_t and the greedy token
        alive = torch.ones(feat.shape[0], dtype=torch.bool)
        for j in range(k):
            t = torch.arange(feat.shape[0])
            follows = (xx[t + 1 + j] == yy[t + j])  # the text took the model's greedy choice at this step
            alive &= follows
            feat, lg = dh.step(feat, tok)
            d = dh.vocab[lg.argmax(-1)].cpu()
            hit = d == yy[t + 1 + j]
            tried[j] += float(alive.sum())
            alive &= hit
            ok[j] += float(alive.sum())
            tok = d.to(engine.device)
    return [round(float(ok[j] / tried[j]), 4) if tried[j] else 0.0 for j in range(k)]


def train_draft_head(model: str, out: Path, tokens: int, generated: int, vocab_size: int, hidden: int, epochs: int,
                     lr: float, eval_tokens: int, chat: int = 0, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    eng = load(model, weights="float32")  # trained against the float model (the native form shares its fingerprint)
    V = eng.cfg.vocab_size
    if not 1 <= vocab_size <= V:
        raise PonderError(f"--vocab must be in [1, {V}] for this model, got {vocab_size}")
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    fcache = out.parent / (out.name + ".features.safetensors")
    text, data, ids, n = training_ids(eng, model, tokens, SEQ * 4, "the draft head")
    if fcache.is_file():
        st = load_file(str(fcache))
        feats = [(st[f"f{i}"], st[f"y{i}"], st[f"x{i}"]) for i in (0, 1) if f"f{i}" in st]
        n_chat = int(st["n_chat"])
    else:
        feats = [features(eng, [ids[i:i + SEQ] for i in range(0, n, SEQ)], progress=progress)]
        gen = self_generated(eng, ids, generated, progress) if generated else []
        n_chat = len(gen)
        gen += chat_generated(eng, text, calib_path().read_text(), chat, progress)
        n_chat = len(gen) - n_chat
        if gen:
            feats.append(features(eng, gen, progress=progress))
        save_file({**{f"{k}{i}": t.contiguous() for i, fy in enumerate(feats) for k, t in zip("fyx", fy)},
                   "n_chat": torch.tensor(n_chat)}, str(fcache))
    data_s = time.perf_counter() - t0
    counts = torch.bincount(torch.cat([y.reshape(-1) for _, y, _ in feats]), minlength=V)
    vocab = torch.sort(torch.argsort(counts, descending=True)[:vocab_size]).values
    coverage = float(counts[vocab].sum() / counts.sum())
    mod, losses = train_head(eng, feats, vocab, hidden, epochs, lr, out.parent / (out.name + ".partial.safetensors"),
                             progress=progress)
    train_s = time.perf_counter() - t0 - data_s
    mod = mod.half().float()  # stored in float16: evaluate what ships
    dh = as_draft_head(eng, mod, vocab, {})
    held = {name: chain_acceptance(eng, dh, eng.tokenizer.encode(repo_data(name).read_text())[:eval_tokens], 6)
            for name in ("code.txt", "prose.txt")}
    card = {"kind": "draft-head", "base_model": str(model), "base_fingerprint": fingerprint(eng.model),
            "method": "EAGLE-style feature drafter as a residual MLP on [norm(f); embed(x)], reduced-vocabulary "
                      "head (FR-Spec), trained on the frozen model's features over text and its own greedy "
                      "continuations; CE + smooth-L1, three-step unroll",
            "hidden": hidden, "vocab": vocab_size, "vocab_coverage_of_greedy_tokens": round(coverage, 4),
            "data": {**data, "text_tokens": n, "generated_sequences": len(feats[1][0]) if len(feats) > 1 else 0,
                     "of_which_chat_answers": n_chat,
                     "generated_tokens_each": GEN_NEW, "excludes": "data/eval/*"},
            "training": {"minutes": round((time.perf_counter() - t0) / 60, 2), "data_s": round(data_s, 1),
                         "train_s": round(train_s, 1), "epochs": epochs, "lr": lr, "epoch_losses":
                         [round(x, 4) for x in losses]},
            "stored_dtype": "float16",
            "command": f"ponder train draft-head --model {model} --tokens {tokens} --generated {generated} "
                       f"--chat {chat} --vocab {vocab_size} --hidden {hidden} --epochs {epochs} --lr {lr}",
            "machine": environment(eng.device, eng.dtype),
            "heldout_greedy_acceptance_by_position": held}
    save_adapter(out.with_suffix(".safetensors"), {k: v.half() if v.is_floating_point() else v
                                                   for k, v in dh.tensors().items()}, card)
    for p in (fcache, out.parent / (out.name + ".partial.safetensors")):
        p.unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ponder train draft-head", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=196608, help="training-text tokens (teacher-forced features)")
    ap.add_argument("--generated", type=int, default=16384, help="tokens of the model's own greedy continuations")
    ap.add_argument("--chat", type=int, default=16384, help="tokens of the model's own answers to chat requests "
                    "built from training text")
    ap.add_argument("--vocab", type=int, default=8192, help="rows of the reduced draft head")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per evaluation file")
    ap.add_argument("--out", default=None, help="adapter path without suffix (default adapters/<model>/draft-head)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else Path("adapters") / Path(str(a.model)).stem / "draft-head"
    card = train_draft_head(a.model, out, a.tokens, a.generated, a.vocab, a.hidden, a.epochs, a.lr, a.eval_tokens,
                            a.chat)
    for name, acc in card["heldout_greedy_acceptance_by_position"].items():
        print(f"{name}: greedy acceptance by draft position {acc}")
    print(f"vocabulary coverage {card['vocab_coverage_of_greedy_tokens']}; wrote {out.with_suffix('.safetensors')} "
          f"and its card ({card['training']['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
