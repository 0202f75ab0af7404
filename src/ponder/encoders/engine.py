"""The encoder forward pass with token reduction, and the counters that say what it really cost.

One loop serves every encoder policy:

    for each layer:   reducer.skip(i)?                       # static layer skipping
                      attention: queries = live rows, keys = live rows + frozen rows (early exit)
                      reducer.mid(i, ...)                    # prune / merge between attention and FFN
                      FFN over the live rows
                      reducer.after(i, ...)                  # early exit: freeze rows that stopped changing

Rows that leave (pruned, merged away, frozen) leave the matrices: each batch row is compacted and the batch cut to
its longest row, so with padding a batch of 32 shrinks too. Every original position keeps a pointer (``slot``) to
the row that now represents it, or a frozen copy of its last state, so pooling still runs over the original
positions (DyMU's "virtual unmerging": a merged row counts once per original token it stands for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.bert import attn_block, embed_tokens, ffn_block, key_bias, pool
from ..models.bert_config import EncoderConfig
from ..models.bert_loader import EncoderModel
from .reduce import compaction, gather_rows, remap


# ---- counters -------------------------------------------------------------------------------------------------------
@dataclass
class EncoderStats:
    """FLOPs counted where the rows are computed. ``flops`` counts live (non-padding) rows, the policy's work;
    ``padded_flops`` counts every row of the matrices actually multiplied, padding included."""

    cfg: EncoderConfig
    flops: float = 0.0
    dense_flops: float = 0.0
    overhead_flops: float = 0.0  # similarity matrices, cosines, scores: what deciding cost
    padded_flops: float = 0.0
    dense_padded_flops: float = 0.0
    texts: int = 0
    tokens: int = 0
    token_layers: float = 0.0  # sum over original tokens of the layers whose FFN ran on a row holding them
    layers_run: int = 0
    layers_seen: int = 0

    def begin(self, lengths: torch.Tensor, T: int) -> None:
        c = self.cfg
        per = c.qo_flops + c.kv_flops + c.ffn_flops
        n = lengths.double()
        L = c.num_hidden_layers
        self.texts += int(lengths.numel())
        self.tokens += int(n.sum())
        self.dense_flops += L * float((n * per + n * n * c.pair_flops).sum())
        self.dense_padded_flops += L * lengths.numel() * (T * per + T * T * c.pair_flops)

    def layer(self, nq: torch.Tensor, nk: torch.Tensor, nf: torch.Tensor, pq: int, pk: int, pf: int) -> None:
        """Live rows per text (B,) that ran queries, keys/values and the FFN; p*: padded row counts."""
        c = self.cfg
        B = nq.numel()
        self.flops += float((nq * c.qo_flops + nk * c.kv_flops + nf * c.ffn_flops + nq * nk * c.pair_flops).sum())
        self.padded_flops += B * (pq * c.qo_flops + pk * c.kv_flops + pf * c.ffn_flops + pq * pk * c.pair_flops)
        self.layers_run += 1
        self.layers_seen += 1

    def skip(self) -> None:
        self.layers_seen += 1

    def add_overhead(self, flops: float) -> None:
        self.overhead_flops += flops

    @property
    def flops_fraction(self) -> float:
        return (self.flops + self.overhead_flops) / self.dense_flops if self.dense_flops else 1.0

    @property
    def padded_fraction(self) -> float:
        """What the hardware multiplied (padding included) over dense on the same padded batches."""
        d = self.dense_padded_flops
        return (self.padded_flops + self.overhead_flops) / d if d else 1.0

    def summary(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens, "flops_fraction": round(self.flops_fraction, 6),
                "padded_flops_fraction": round(self.padded_fraction, 6),
                "executed_gflops": round((self.flops + self.overhead_flops) / 1e9, 6),
                "dense_gflops": round(self.dense_flops / 1e9, 6),
                "overhead_gflops": round(self.overhead_flops / 1e9, 6),
                "mean_layers_per_token": round(self.token_layers / self.tokens, 4) if self.tokens else None}


# ---- the token state ------------------------------------------------------------------------------------------------
@dataclass
class TokenState:
    """Rows in flight, and where every original position went.

    x (B, n, D): live rows (queries of the next layer); valid (B, n) or None (all live); size (B, n) or None (every
    row one token; merged rows count several); special (B, n): rows never removed ([CLS], [SEP]); ctx (B, m, D):
    frozen rows still used as keys/values; slot (B, T0): live row of each original position, -1 once it retired
    into ``final``; pool_w (B, T0): the pooling weight of each original position (0: padding or dropped).
    """

    x: torch.Tensor
    valid: torch.Tensor | None
    size: torch.Tensor | None
    special: torch.Tensor
    slot: torch.Tensor
    pool_w: torch.Tensor
    final: torch.Tensor | None = None
    final_layer: torch.Tensor | None = None  # (B, T0): the stage (see ``stage``) a retired position froze at
    stage: int = -1  # what ``x`` is: 2*i after layer i's attention (before its FFN), 2*i+1 after layer i
    ctx: torch.Tensor | None = None
    ctx_valid: torch.Tensor | None = None
    scratch: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # a policy's per-row tensors (B, n, ...), compacted along with x

    @property
    def live(self) -> torch.Tensor:
        return self.valid if self.valid is not None else torch.ones(self.x.shape[:2], dtype=torch.bool,
                                                                        device=self.x.device)

    def counts(self) -> torch.Tensor:
        return self.valid.sum(1) if self.valid is not None else torch.full((self.x.shape[0],), self.x.shape[1],
                                                                            device=self.x.device)

    def ctx_counts(self) -> torch.Tensor | int:
        if self.ctx is None:
            return 0
        return self.ctx_valid.sum(1) if self.ctx_valid is not None else self.ctx.shape[1]

    def bias(self) -> torch.Tensor | None:
        """Attention bias over [live rows | frozen rows]."""
        v, s = self.valid, self.size
        if self.ctx is not None and self.ctx.shape[1]:
            cv = self.ctx_valid
            if v is not None or cv is not None:
                v = torch.cat([self.live, cv if cv is not None else torch.ones(self.ctx.shape[:2], dtype=torch.bool,
                                                                               device=self.x.device)], 1)
            if s is not None:
                s = torch.cat([s, s.new_ones(self.ctx.shape[:2])], 1)
        return key_bias(v, s, self.x.dtype)

    def _retire(self, gone: torch.Tensor, freeze: bool) -> None:
        """Record rows (B, n) about to leave: their last state becomes the final state of their positions
        (``freeze``), or their positions stop counting in pooling."""
        pos = (self.slot >= 0) & gone.gather(1, self.slot.clamp_min(0))
        if freeze:
            if self.final is None:
                B, T0 = self.slot.shape
                self.final = self.x.new_zeros(B, T0, self.x.shape[-1])
                self.final_layer = torch.full_like(self.slot, -1)
            b, t = pos.nonzero(as_tuple=True)  # copy only the leaving rows (a handful per text)
            self.final[b, t] = self.x[b, self.slot[b, t]]
            self.final_layer[b, t] = self.stage
        else:
            self.pool_w = self.pool_w.masked_fill(pos, 0.0)

    def keep_rows(self, keep: torch.Tensor, freeze: bool = True, dst: torch.Tensor | None = None) -> None:
        """Compact to the rows in ``keep`` (B, n). Without ``dst`` the others retire; with ``dst`` (B, n) each
        removed row was merged into row dst[b, j] and its positions now follow that row."""
        keep = keep & self.live
        if dst is None:
            self._retire(self.live & ~keep, freeze)
        else:
            self.slot = dst.gather(1, self.slot.clamp_min(0)).masked_fill_(self.slot < 0, -1)
        order, self.valid, old_to_new = compaction(keep)
        self.slot = remap(self.slot, old_to_new)
        self._gather(order)

    def rejoin(self) -> None:
        """Bring every frozen position back as a live row (from its frozen state), so the last layers run on
        all tokens again. Frozen key/value rows are dropped: those tokens are live now."""
        if self.final is None or self.final_layer is None:
            return
        back = (self.slot < 0) & (self.final_layer >= 0)
        if not bool(back.any()):
            return
        B, n = self.x.shape[:2]
        b_order, b_valid, b_o2n = compaction(back)
        add = gather_rows(self.final, b_order)
        add_valid = b_valid if b_valid is not None else torch.ones(add.shape[:2], dtype=torch.bool,
                                                                    device=add.device)
        self.slot = torch.where(back, n + b_o2n, self.slot)
        self.final_layer = self.final_layer.masked_fill(back, -1)
        self.x = torch.cat([self.x, add], 1)
        self.special = torch.cat([self.special, torch.zeros_like(add_valid)], 1)
        if self.size is not None:
            self.size = torch.cat([self.size, self.size.new_ones(add_valid.shape)], 1)
        self.rows = {}
        self.ctx = self.ctx_valid = None
        order, self.valid, old_to_new = compaction(torch.cat([self.live, add_valid], 1) if self.valid is not None
                                                   else torch.cat([torch.ones(B, n, dtype=torch.bool,
                                                                              device=add.device), add_valid], 1))
        self.slot = remap(self.slot, old_to_new)
        self._gather(order)

    def freeze_rows(self, frozen: torch.Tensor) -> None:
        """Early exit: ``frozen`` rows (B, n) stop being computed but stay keys/values of every later layer."""
        frozen = frozen & self.live
        self._retire(frozen, True)
        fr_order, fr_valid, _ = compaction(frozen)
        new = gather_rows(self.x, fr_order)
        nv = fr_valid if fr_valid is not None else torch.ones(new.shape[:2], dtype=torch.bool, device=new.device)
        if self.ctx is None:
            ctx, cv = new, nv
        else:
            ctx = torch.cat([self.ctx, new], 1)
            cv = torch.cat([self.ctx_valid if self.ctx_valid is not None else
                            torch.ones(self.ctx.shape[:2], dtype=torch.bool, device=new.device), nv], 1)
        c_order, self.ctx_valid, _ = compaction(cv)
        self.ctx = gather_rows(ctx, c_order)
        order, self.valid, old_to_new = compaction(self.live & ~frozen)
        self.slot = remap(self.slot, old_to_new)
        self._gather(order)

    def _gather(self, order: torch.Tensor) -> None:
        self.x = gather_rows(self.x, order)
        self.special = gather_rows(self.special, order)
        if self.size is not None:
            self.size = gather_rows(self.size, order)
        for k, v in self.rows.items():
            self.rows[k] = gather_rows(v, order)

    def tokens(self, maps: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """(B, T0, D): each original position's final state: its live row, or its frozen copy, carried to the
        last layer's space by ``maps[layer]`` (an affine map fitted on calibration text) when given."""
        cur = gather_rows(self.x, self.slot.clamp_min(0)) if self.x.shape[1] else None
        if self.final is None:
            return cur
        final = self.final
        if maps:
            final = final.clone()
            for l in self.final_layer.unique().tolist():
                if l in maps:
                    m = self.final_layer == l
                    A, b = maps[l]
                    final[m] = torch.addmm(b, final[m], A)
        if cur is None:
            return final
        return torch.where((self.slot >= 0)[..., None], cur, final)


class Reducer(Protocol):
    """A policy's per-call decisions. Every hook may mutate the state through its methods."""

    maps: dict | None  # affine maps for frozen states (see EncoderEngine.extrapolators), or None

    def skip(self, i: int) -> bool: ...
    def rejoin(self, i: int) -> bool: ...  # before layer i, frozen tokens come back as live rows
    def wants_probs(self, i: int) -> bool | str: ...  # "first": only [CLS]'s probabilities
    def mid(self, i: int, st: TokenState, keys: torch.Tensor, probs: torch.Tensor | None,
            stats: EncoderStats | None) -> None: ...
    def after(self, i: int, st: TokenState, x_in: torch.Tensor, stats: EncoderStats | None) -> None: ...


class ReducerBase:
    """No-op hooks, so a policy overrides only what it uses."""

    maps: dict | None = None

    def skip(self, i: int) -> bool:
        return False

    def rejoin(self, i: int) -> bool:
        return False

    def wants_probs(self, i: int) -> bool:
        return False

    def mid(self, i, st, keys, probs, stats) -> None:
        return None

    def after(self, i, st, x_in, stats) -> None:
        return None


# ---- the engine -----------------------------------------------------------------------------------------------------
class EncoderEngine:
    """A loaded encoder plus the reducing forward pass."""

    def __init__(self, model: EncoderModel):
        self.model = model
        self.W = model.weights
        self.cfg = model.cfg
        self.tokenizer = model.tokenizer
        self.pooling = model.pooling
        self.name = model.name
        self.path = model.path
        self.pad_id = self.cfg.pad_token_id

    def batch(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        T = int(lengths.max())
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, lengths

    def extrapolators(self, seqs: list[list[int]], ridge: float = 1e-2) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per stage (2*i: after layer i's attention; 2*i+1: after layer i), the affine map (A, b) that best predicts
        a token's last-layer state from its state at that stage: least squares over the tokens of ``seqs``
        (calibration text, never evaluation text). A token frozen early passes through it for pooling, so it lands
        in the space the pooled vector lives in. Closed form, no gradient training; fitted once per engine."""
        key = (len(seqs), sum(map(len, seqs)), ridge)
        cache = getattr(self, "_maps", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        W, L, D = self.W, self.cfg.num_hidden_layers, self.cfg.hidden_size
        outs: list[list[torch.Tensor]] = [[] for _ in range(2 * L)]
        with torch.inference_mode():
            for s in range(0, len(seqs), 32):
                ids, lengths = self.batch(seqs[s:s + 32])
                T = ids.shape[1]
                valid = torch.arange(T)[None, :] < lengths[:, None]
                x = embed_tokens(W, ids, valid)
                bias = key_bias(valid, None, x.dtype)
                for i in range(L):
                    h = attn_block(W, i, x, None, bias)[0]
                    x = ffn_block(W, i, h)
                    outs[2 * i].append(h[valid].double())
                    outs[2 * i + 1].append(x[valid].double())
            y = torch.cat(outs[2 * L - 1])
            reg = torch.cat([torch.ones(D), torch.zeros(1)]).double()
            maps = {}
            for stage in range(2 * L - 1):
                X = torch.cat(outs[stage])
                X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
                G = X1.T @ X1 + torch.diag(ridge * len(X) * reg)
                sol = torch.linalg.solve(G, X1.T @ y)
                maps[stage] = (sol[:D].to(W.word.dtype).contiguous(), sol[D].to(W.word.dtype))
        self._maps = (key, maps)
        return maps

    @torch.inference_mode()
    def encode(self, seqs: list[list[int]], reducer: Reducer | None = None, stats: EncoderStats | None = None,
               tokens_out: bool = False) -> torch.Tensor:
        """Pooled embeddings (B, D) of token id sequences (special tokens included). ``tokens_out``: return the
        per-position final states (B, T, D) instead (tests, analysis)."""
        ids, lengths = self.batch(seqs)
        W, L = self.W, self.cfg.num_hidden_layers
        B, T = ids.shape
        valid = None if bool((lengths == T).all()) else torch.arange(T)[None, :] < lengths[:, None]
        pool_w = (valid if valid is not None else torch.ones(B, T, dtype=torch.bool)).to(W.word.dtype)
        x = embed_tokens(W, ids, valid)
        if stats is not None:
            stats.begin(lengths, T)
        if reducer is None:
            bias = key_bias(valid, None, x.dtype)
            n = lengths
            for i in range(L):
                h, _, _ = attn_block(W, i, x, None, bias)
                x = ffn_block(W, i, h)
                if stats is not None:
                    stats.layer(n, n, n, T, T, T)
                    stats.token_layers += float(n.sum())
            tokens = x
        else:
            pos = torch.arange(T)[None, :]
            st = TokenState(x=x, valid=valid, size=None, special=(pos == 0) | (pos == lengths[:, None] - 1),
                            slot=pos.expand(B, T).masked_fill(pos >= lengths[:, None], -1),  # padding: nowhere
                            pool_w=pool_w, scratch={"lengths": lengths})
            for i in range(L):
                if reducer.skip(i):
                    if stats is not None:
                        stats.skip()
                    continue
                if reducer.rejoin(i):
                    st.rejoin()
                if st.x.shape[1] == 0:
                    break  # every row has exited
                if stats is not None:
                    nq, pq = st.counts(), st.x.shape[1]
                    nk = nq + st.ctx_counts()
                    pk = pq + (st.ctx.shape[1] if st.ctx is not None else 0)
                x_in = st.x
                want = reducer.wants_probs(i)
                h, p, k = attn_block(W, i, st.x, st.ctx, st.bias(), want)
                st.x, st.stage = h, 2 * i
                reducer.mid(i, st, k, p, stats)
                st.x = ffn_block(W, i, st.x)
                if stats is not None:
                    nf = st.counts()
                    stats.layer(nq, nk, nf, pq, pk, st.x.shape[1])
                    stats.token_layers += float((st.slot >= 0).sum())
                st.stage = 2 * i + 1
                reducer.after(i, st, x_in if st.x.shape[1] == x_in.shape[1] else None, stats)
            if not tokens_out and self.pooling.mode in ("mean", "mean_sqrt_len"):
                return self._mean_pool(st, reducer.maps, stats)
            tokens = st.tokens(reducer.maps)
            if stats is not None and reducer.maps and st.final_layer is not None:
                stats.add_overhead(2.0 * float((st.final_layer >= 0).sum()) * self.cfg.hidden_size ** 2)
            pool_w = st.pool_w
        if tokens_out:
            return tokens
        return pool(tokens, pool_w, self.pooling.mode, self.pooling.normalize)

    def _mean_pool(self, st: TokenState, maps: dict | None, stats: EncoderStats | None) -> torch.Tensor:
        """Mean pooling over the original positions without building the (B, T0, D) token states: each live row
        counts once per position it stands for, and the frozen states are summed per stage, where the stage's
        affine map is applied once to the sum (the map is affine, so this equals mapping every token)."""
        D = self.cfg.hidden_size
        live_pos = (st.slot >= 0).to(st.pool_w.dtype) * st.pool_w
        w_rows = st.pool_w.new_zeros(st.x.shape[:2]).scatter_add_(1, st.slot.clamp_min(0), live_pos)
        total = torch.bmm(w_rows[:, None, :], st.x)[:, 0]
        if st.final is not None:
            fl = st.final_layer
            for stage in fl.unique().tolist():
                if stage < 0:
                    continue
                m = (fl == stage).to(st.pool_w.dtype) * st.pool_w
                part = torch.bmm(m[:, None, :], st.final)[:, 0]
                if maps and stage in maps:
                    A, b = maps[stage]
                    part = torch.addmm(m.sum(1, keepdim=True) * b, part, A)
                    if stats is not None:
                        stats.add_overhead(2.0 * m.shape[0] * D * D)
                total = total + part
        n = st.pool_w.sum(1, keepdim=True).clamp_min(1e-9)
        out = total / (n if self.pooling.mode == "mean" else n.sqrt())
        return torch.nn.functional.normalize(out, p=2, dim=1) if self.pooling.normalize else out
