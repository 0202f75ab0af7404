"""Self-speculative decoding: draft with the first ``E`` layers and the shared head, verify with the rest in one pass.

After LayerSkip (Elhoushi et al., 2024) and DEL. One round, for the last emitted token ``x``:

1. Draft. ``x`` and then each new draft token run layers ``[0, E)`` one at a time (``Engine.forward(last_layer=E)``);
   the final norm and LM head on the exit state propose the next draft token. ``k`` drafts take ``k + 1`` such
   steps (the last only to get the last draft's exit state; no head). Every step writes layers ``[0, E)`` of the
   KV cache, exactly as the dense model would, because the inputs are the same tokens.
2. Verify. The ``k + 1`` saved exit states resume at layer ``E`` in a single pass over layers ``[E, L)``
   (``Engine.forward(first_layer=E, hidden=...)``): the draft layers' K/V are reused, never recomputed, and the
   pass yields the full model's logits after ``x`` and after each draft.
3. Accept. Greedy: drafts are kept while they equal the full model's argmax; the first disagreement is replaced by
   the full model's token, and if all ``k`` agree the full model's next token is a free bonus. Sampling: standard
   speculative rejection sampling (accept ``d`` with probability ``min(1, p(d) / q(d))``, else resample from
   ``max(0, p - q)``), which keeps the dense distribution. Rejected columns are dropped with ``KVCache.truncate``;
   the kept ones hold exactly the dense model's K/V, so the greedy output is the dense output.

Batches advance together: every row keeps the smallest accepted count of the batch (rows that accepted more drop
their extra drafts, which stay valid samples, and draft them again). The draft length adapts online: one longer
after a fully accepted round, one shorter after a rejection.

Accounting (only when the caller passes a Stats: counting costs time in every layer). The engine counts every layer
and head call that ran (drafts thrown away included) into a private Stats; the caller's Stats then gets that work,
while its dense side counts, per token the dense model would have fed, one dense decode step. Head calls beyond the
dense model's one per token are policy overhead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..models import quant
from .forward import Engine
from .generate import GenerationResult, SamplingConfig, begin, distribution, emit_column, pick, prefill
from .stats import Stats


@dataclass
class SpecConfig:
    exit_layer: int  # E: drafts use layers [0, E)
    draft_len: int = 4  # initial number of drafts per round
    max_draft: int = 12
    adaptive: bool = True
    drafter: str = "layers"  # "layers" | "lookup" | "lookup+layers"
    ngram: int = 3  # lookup: longest suffix matched against the context ...
    ngram_min: int = 2  # ... and the shortest
    # Lookup drafts per round, fixed: they cost no model work and verifying up to 11 rows costs ~1.5x one step (the
    # few-rows kernel), so a rejected tail is cheap, while shrinking the draft after a miss forfeits the long copies
    # that make lookup pay (SmolLM2, 12 grounded chat prompts: 1.84x adapting from 4, 2.14x fixed at 10, 2.12x at 14).
    lookup_len: int = 10
    # Maps a draft's exit state (B, D) before the shared head (trained exit translators), or None: the plain head.
    draft_lens: Callable[[torch.Tensor], torch.Tensor] | None = None
    # drafter "head": a trained draft module on the final features (models.adapters.DraftHead)
    draft_head: Any = None

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, not {self.drafter!r}")


DRAFTERS = ("layers", "lookup", "lookup+layers", "head", "lookup+head")


def lookup(seq: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the context's last ``n`` tokens
    (longest ``n`` first): prompt-lookup drafting, free of model work, strong wherever text repeats itself."""
    T = len(seq)
    for n in range(min(n_max, T - 1), n_min - 1, -1):
        tail = seq[T - n:]
        for s in range(T - n - 1, -1, -1):
            if seq[s:s + n] == tail:
                return seq[s + n:s + n + k]
    return []


def lookup_drafts(hist: list[list[int]], done: list[bool], spec: SpecConfig, k: int) -> torch.Tensor | None:
    """(B, m) drafts when every live row found a continuation (m: the shortest), else None."""
    if k < 1:
        return None
    conts = [[] if done[b] else lookup(h, k, spec.ngram, spec.ngram_min) for b, h in enumerate(hist)]
    live = [c for b, c in enumerate(conts) if not done[b]]
    m = min((len(c) for c in live), default=0)
    if m == 0:
        return None
    return torch.tensor([(c + [0] * m)[:m] for c in conts], dtype=torch.long)


def sampled_round(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, live: torch.Tensor,
                  gen: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """Speculative rejection sampling for one round of a batch.

    p: (B, k+1, V) target probabilities after ``x`` and after each draft; q: (B, k, V) draft probabilities;
    drafts: (B, k). Returns (a, nxt): the batch keeps ``a`` drafts (the smallest accepted count over live rows),
    and ``nxt`` (B,) is each row's token at position ``a``: its accepted draft there, a resample from
    ``max(0, p - q)`` where it rejected, or a bonus sample from ``p`` when all ``k`` were accepted. Each is a draw
    from the target distribution, so the output law is the dense model's."""
    B, k = drafts.shape
    if k:
        pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
        qd = q.gather(-1, drafts[..., None]).squeeze(-1)
        u = torch.rand(B, k, generator=gen).to(p.device)
        per_row = (u * qd < pd).long().cumprod(1).sum(1)  # u < p/q without dividing by a zero q
    else:
        per_row = torch.zeros(B, dtype=torch.long, device=p.device)
    a = int(per_row[live].min()) if bool(live.any()) else 0
    if a == k:
        return a, torch.multinomial(p[:, a], 1, generator=gen).squeeze(1)
    resid = (p[:, a] - q[:, a]).clamp_min(0)
    norm = resid.sum(-1, keepdim=True)
    resid = torch.where(norm > 0, resid / norm.clamp_min(1e-30), p[:, a])
    fresh = torch.multinomial(resid, 1, generator=gen).squeeze(1)
    return a, torch.where(per_row > a, drafts[:, a], fresh)


def speculative_generate(engine: Engine, prompts: list[list[int]], sc: SamplingConfig, spec: SpecConfig,
                         stats: Stats | None = None, on_token=None) -> GenerationResult:
    L = engine.cfg.num_hidden_layers
    E = spec.exit_layer
    if not 1 <= E < L:
        raise ValueError(f"exit layer must be in [1, {L}), got {E}")
    B, N = len(prompts), sc.max_new_tokens
    ids, pad, cache, gen = begin(engine, prompts, sc, N + max(spec.max_draft, spec.lookup_len) + 1)
    greedy = sc.temperature == 0
    stop = sc.stops(engine)
    out: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = [False] * B
    # The engine's counts of what ran, for the caller's Stats; none without one (counting costs time per layer).
    work = engine.new_stats(record_tokens=False) if stats is not None else None

    def emit(col: list[int]) -> None:
        emit_column(col, out, done, finish, stop, on_token)

    emitted = 0
    drafted = accepted = rounds = 0
    fed: list[int] = []  # cache columns the dense model would have fed in decode (for the dense-side count)
    k = max(1, min(spec.draft_len, spec.max_draft))
    k_lu = max(1, spec.lookup_len)
    use_lookup, use_layers, use_head = "lookup" in spec.drafter, "layers" in spec.drafter, "head" in spec.drafter
    dh = spec.draft_head
    if use_head and dh is None:
        raise ValueError("drafter 'head' needs a draft head (SpecConfig.draft_head)")
    head_step_flops = (2.0 * sum(math.prod(quant.logical_shape(t)) for t in (dh.w1, dh.w2, dh.head))
                       if use_head else 0.0)
    hist = [list(p) for p in prompts]
    lookup_rounds = layer_rounds = head_rounds = 0
    # per draft position: rounds that reached it (all earlier drafts accepted), and of those the rounds that accepted it
    pos_drafted = [0] * max(spec.max_draft, k_lu, 1)
    pos_accepted = [0] * len(pos_drafted)
    t0 = time.perf_counter()
    with torch.inference_mode():
        o = prefill(engine, ids, pad, cache, None, stats)
        logits, f_prev = o.logits, o.hidden[:, -1]  # f_prev: the final state that produced x (the head drafter's input)
        t1 = time.perf_counter()
        x = pick(logits, sc, gen)
        emit(x.tolist())
        for b in range(B):
            hist[b].append(int(x[b]))
        emitted = 1
        while emitted < N and not all(done):
            start = cache.length
            hs, drafts, qs = [], [], []
            found = lookup_drafts(hist, done, spec, min(k_lu, N - emitted - 1)) if use_lookup else None
            if found is not None:  # drafts from the context: one full pass verifies them all
                kk = found.shape[1]
                block = torch.cat([x[:, None], found.to(x.device)], 1)
                o = engine.forward(block, cache, None, work, logits="all", phase="verify")
                if not greedy:
                    qs = list(F.one_hot(found.to(x.device), engine.cfg.vocab_size).float().unbind(1))
                lookup_rounds += 1
            elif use_head:  # the trained head chains kk drafts from the last final state; one pass verifies them
                kk = min(k, N - emitted - 1)
                head_rounds += 1
                f, tok = f_prev, x
                for _ in range(kk):
                    f, lg = dh.step(f, tok)
                    if greedy:
                        tok = dh.vocab[lg.argmax(-1)]
                    else:
                        qr = distribution(lg, sc)
                        qs.append(torch.zeros(B, engine.cfg.vocab_size, dtype=qr.dtype, device=qr.device)
                                  .index_copy_(1, dh.vocab, qr))
                        tok = dh.vocab[torch.multinomial(qr, 1, generator=gen).squeeze(1)]
                    drafts.append(tok)
                if work is not None:
                    work.add_overhead(head_step_flops * B * kk)
                block = torch.stack([x] + drafts, 1)
                o = engine.forward(block, cache, None, work, logits="all", phase="verify")
            elif not use_layers:  # lookup only, nothing found: one plain dense step
                kk = 0
                block = x[:, None]
                o = engine.forward(block, cache, None, work, logits="all", phase="decode")
            else:
                kk = min(k, N - emitted - 1)
                layer_rounds += 1
                tok = x
                lens = spec.draft_lens
                for j in range(kk + 1):  # 1. draft
                    o = engine.forward(tok[:, None], cache, None, work,
                                       logits="last" if j < kk and lens is None else None, phase="decode",
                                       last_layer=E)
                    hs.append(o.hidden)
                    if j < kk:
                        lg = o.logits
                        if lens is not None:
                            lg = engine.logits(lens(o.hidden[:, -1]))
                            if work is not None:
                                work.add_head(B, B)
                        if greedy:
                            tok = lg.argmax(-1)
                        else:
                            qs.append(distribution(lg, sc))
                            tok = torch.multinomial(qs[-1], 1, generator=gen).squeeze(1)
                        drafts.append(tok)
                block = torch.stack([x] + drafts, 1)  # (B, kk+1)
                if work is not None:  # a resumed forward begins no step: size the counters for it
                    work.begin_step(B, kk + 1, start)
                o = engine.forward(block, cache, None, work, logits="all", phase="verify", first_layer=E,
                                   hidden=torch.cat(hs, 1))  # 2. verify: (B, kk+1, V)
            v = o.logits
            d = block[:, 1:]
            live = torch.tensor([not x_ for x_ in done], device=v.device)
            if greedy:  # 3. accept
                tgt = v.argmax(-1)
                per_row = (tgt[:, :kk] == d).long().cumprod(1).sum(1)
                a = int(per_row[live].min())
                nxt = tgt[:, a]
            else:
                p = distribution(v.reshape(B * (kk + 1), -1), sc).view(B, kk + 1, -1)
                q = torch.stack(qs, 1) if qs else p[:, :0]
                a, nxt = sampled_round(p, q, d, live, gen)
            cache.truncate(start + a + 1)
            fed += list(range(start, start + a + 1))
            f_prev = o.hidden[:, a]
            for j in range(min(a + 1, kk)):  # positions this round reached (every draft before them accepted)
                pos_drafted[j] += 1
                pos_accepted[j] += j < a
            for j in range(a):
                emit(d[:, j].tolist())
            emit(nxt.tolist())
            emitted += a + 1
            drafted += kk
            accepted += a
            rounds += 1
            x = nxt
            for b in range(B):
                hist[b] = hist[b] + d[b, :a].tolist() + [int(nxt[b])]
            if spec.adaptive and kk and found is None:
                k = min(k + 1, spec.max_draft) if a == kk else max(1, k - 1)
    t2 = time.perf_counter()
    if stats is not None:
        _account(stats, work, fed, B)
    extra = {"exit_layer": None if use_head else E, "acceptance_rate": accepted / drafted if drafted else None,
             "mean_accepted": accepted / rounds if rounds else None,
             "tokens_per_round": (accepted + rounds) / rounds if rounds else None,
             "rounds": rounds, "drafted": drafted, "final_draft_len": k, "lookup_rounds": lookup_rounds,
             "layer_rounds": layer_rounds, "head_rounds": head_rounds,
             "acceptance_by_position": [round(pos_accepted[j] / pos_drafted[j], 3) for j in range(len(pos_drafted))
                                        if pos_drafted[j]]}
    return GenerationResult(out, finish, stats, prefill_s=t1 - t0, decode_s=t2 - t1, extra=extra)


def _account(stats: Stats, work: Stats, fed: list[int], B: int) -> None:
    """Executed work from ``work``; the dense side as if each fed column had been one dense decode step."""
    for col in fed:
        stats.begin_step(B, 1, col)
        stats.end_step()
    dense_heads = stats.head_row_flops * B * len(fed)
    stats.flops += work.flops
    stats.weight_bytes += work.weight_bytes
    stats.head_flops += dense_heads
    stats.dense_head_flops += dense_heads
    stats.overhead_flops += work.overhead_flops + max(0.0, work.head_flops - dense_heads)
    stats.head_bytes += work.head_bytes  # every draft and verification call reads the head
    stats.overhead_bytes += work.overhead_bytes
    stats.dense_head_bytes += stats.head_weight_bytes * len(fed)
