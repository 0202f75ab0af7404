"""The forward pass, driven by an execution plan.

One layer step serves prefill, decode, scoring and speculative verification:

    for each layer:  plan = planner.layer(i, x)       # None: dense
                     attention over plan.attn rows    # gather -> block -> scatter the residual update
                     FFN over plan.ffn rows

A row outside a unit's index set is not computed: its hidden state is gathered out, the block runs on the smaller
matrix, and the update is added back with ``index_add_``. The dense path gathers nothing and builds one mask per
step, so a plain model pays nothing for the machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import PonderError
from ..models import quant
from ..models.config import ModelConfig
from ..models.llama import LlamaModel, apply_rope, rms_norm, rope_tables
from . import steps
from .cache import KVCache, ShrinkingCache
from .plan import LayerPlan
from .stats import Stats
from .steps import PythonSteps, attend, rotated_qkv, row_kv


@dataclass
class LayerWeights:
    """One layer's tensors. q/k/v and gate/up are fused into single matrices when the engine owns its weights
    (fewer, larger matmuls: decode at batch 1 is dominated by per-op overhead); when it borrows a transformers
    model's tensors (``fuse=False``) they stay separate and nothing is copied."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    wq: torch.Tensor
    wkv: tuple[torch.Tensor, ...]  # (wk|wv fused) or (wk, wv)
    wqkv: torch.Tensor | None  # fused q|k|v, or None
    bq: torch.Tensor | None
    bkv: tuple[torch.Tensor, ...] | None
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    wgu: tuple[torch.Tensor, ...]  # (gate|up fused) or (gate, up)
    wd: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qdim: int
    kvdim: int
    # The matrix product every half uses: the compiled kernels' (a few rows stream the weights once) when they are
    # loaded, so the Python halves and the fused ones compute the same bits; the Python reference otherwise
    # (``quant.linear``: F.linear, after dequantising a block-quantised weight).
    lin: Callable[..., torch.Tensor] = quant.linear

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is not None:
            return self.lin(h, self.wqkv, self.bqkv).split((self.qdim, self.kvdim, self.kvdim), dim=-1)
        k, v = self.kv(h)
        return self.lin(h, self.wq, self.bq), k, v

    def q(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h, self.wq, self.bq)

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bkv = self.bkv or (None,) * len(self.wkv)
        if len(self.wkv) == 1:
            return self.lin(h, self.wkv[0], bkv[0]).split((self.kvdim, self.kvdim), dim=-1)
        return self.lin(h, self.wkv[0], bkv[0]), self.lin(h, self.wkv[1], bkv[1])

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.wgu) == 1:
            g, u = self.lin(h, self.wgu[0]).chunk(2, dim=-1)
        else:
            g, u = self.lin(h, self.wgu[0]), self.lin(h, self.wgu[1])
        return self.lin(F.silu(g) * u, self.wd)


def kernel_layout(p: torch.nn.Parameter) -> None:
    """A block-quantised matrix in the kernels' interleaved row groups (``quant.interleave``), in place, when its
    rows allow: the same bits, read 8 rows at a time (measured over SmolLM2's matrices: 2.6 vs 4.2 ms at one row,
    7.1 vs 16.6 at eight)."""
    if quant.is_quantised(p) and not quant.is_interleaved(p) and p.shape[0] % quant.ROWS == 0:
        p.data = quant.interleave(p.data)


def prepare_layers(model: LlamaModel, fuse: bool = True,
                   lin: Callable[..., torch.Tensor] = quant.linear) -> list[LayerWeights]:
    cfg = model.config
    qdim, kvdim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin_mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            kernel_layout(lin_mod.weight)
        bias = cfg.attention_bias
        # Fusing concatenates rows: the parts must share one form (float, or one block type).
        forms = {(t.dtype, t.shape[2] if quant.is_quantised(t) else 0) for t in
                 (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight)}
        if fuse and len(forms) == 1:
            wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            bqkv = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if bias else None
            split = [t.shape[0] for t in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)]  # rows or row groups
            wq, wkv = wqkv[:split[0]], (wqkv[split[0]:],)
            bq, bkv = (bqkv[:qdim], (bqkv[qdim:],)) if bias else (None, None)
            wgu = (torch.cat([m.gate_proj.weight, m.up_proj.weight]),)
            # Point the module's own parameters into the fused storage so the model is held once, not twice.
            a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data = wqkv.split(split)
            m.gate_proj.weight.data, m.up_proj.weight.data = wgu[0].chunk(2)
        else:
            wqkv = bqkv = None
            wq, wkv = a.q_proj.weight, (a.k_proj.weight, a.v_proj.weight)
            bq, bkv = (a.q_proj.bias, (a.k_proj.bias, a.v_proj.bias)) if bias else (None, None)
            wgu = (m.gate_proj.weight, m.up_proj.weight)
        out.append(LayerWeights(
            ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
            wq=wq, wkv=wkv, wqkv=wqkv, bq=bq, bkv=bkv, bqkv=bqkv, wo=a.o_proj.weight, wgu=wgu,
            wd=m.down_proj.weight,
            q_norm=a.q_norm.weight if cfg.qk_norm else None, k_norm=a.k_norm.weight if cfg.qk_norm else None,
            qdim=qdim, kvdim=kvdim, lin=lin,
        ))
    return out


@dataclass
class StepContext:
    """What a planner may look at when deciding a layer's plan."""

    engine: Engine
    B: int
    T: int
    start: int
    end: int
    positions: torch.Tensor  # (B, T) rotary positions of the new tokens
    phase: str  # "prefill" | "decode" | "score" | "verify"
    stats: Stats | None
    cache: KVCache
    scratch: dict[str, Any] = field(default_factory=dict)


class Planner(Protocol):
    """Everything the engine asks a planner, per forward step. ``PlannerBase`` implements the two optional hooks as
    no-ops, so a policy's planner subclasses it and overrides what it uses."""

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        """Before layer ``i``, with the incoming states (B, T, D): that layer's plan (None: dense)."""
        ...

    def observe(self, i: int, x: torch.Tensor, ctx: StepContext) -> None:
        """After layer ``i``, with its output states (an exit check or a tap reads them here)."""
        ...

    def known_logits(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After the last layer: (flat rows, their logits) the planner already computed from the very same final
        states (an exited token's check), which the engine then does not recompute; None when there are none."""
        ...

    def evict(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> tuple | None:
        """Only on a shrinking cache, after layer ``i`` wrote its K/V (``x_in``: the layer's input states): the
        slots the layer keeps, as ``ShrinkingCache.keep`` takes them ((B, Hk, n) columns and the real count per
        row, optionally the slots it demotes to low precision and the heads it keeps whole), or None to keep
        everything."""
        ...


class PlannerBase:
    """The ``Planner`` contract with its optional hooks as no-ops."""

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        return None

    def observe(self, i: int, x: torch.Tensor, ctx: StepContext) -> None:
        return None

    def known_logits(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def evict(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> tuple | None:
        return None


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor


class Engine:
    """Weights prepared for inference, plus the plan-driven forward pass."""

    def __init__(self, model: LlamaModel, tokenizer: Any = None, fuse: bool = True):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.tokenizer = tokenizer
        mod = steps.compiled(model.model.embed_tokens.weight.device.type == "cpu", fuse)
        self.lin: Callable[..., torch.Tensor] = mod.linear if mod is not None else quant.linear
        self.layers = prepare_layers(model, fuse, self.lin)
        # The layer halves, chosen once: the compiled ones where they apply, the Python reference otherwise.
        self.steps: PythonSteps = steps.choose(self.cfg, self.layers, mod)
        kernel_layout(model.head_weight)  # (the tied embedding with it: its lookups unpack only their row groups)
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.head = model.head_weight
        self.dtype = self.norm.dtype  # the activations' (a block-quantised embedding's own dtype is uint8)
        self.device = self.embed.device
        self.inv_freq = model.inv_freq.to(self.device)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        c = self.cfg
        self._H, self._Hk, self._hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.name = "model"
        # What the loader knows about the model beyond its weights (``ponder.api`` fills these in).
        self.path: Any = None
        self.chat_template: str | None = None
        self.stop_tokens: tuple[int, ...] = tuple(self.cfg.eos_token_id)  # end-of-sequence / end-of-turn ids
        self.weights_form = str(self.dtype).removeprefix("torch.")
        self.quantised = quant.is_quantised(self.layers[0].wd) if self.layers else False
        self.gguf: Any = None  # models.gguf.GGUFInfo when opened from a GGUF file

    # ---- small pieces, also used by policies ------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, shrinking: bool = False) -> KVCache:
        """A cache for ``batch`` rows of up to ``max_len`` tokens; ``shrinking``: one a KV policy can cut down."""
        cls = ShrinkingCache if shrinking else KVCache
        return cls(self.cfg, batch, max_len, self.dtype, self.device)

    def queries(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s rotated queries (B, H, n, hd) for its input states ``x`` (B, n, D) at ``positions``
        (B, n): the same values its attention computes, for a KV policy that scores cached keys by attention."""
        w, (B, n, _) = self.layers[i], x.shape
        q = w.q(rms_norm(x, w.ln1, self.cfg.rms_norm_eps)).view(B, n, self._H, self._hd)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, self.cfg.rms_norm_eps)
        cos, sin = self.rope(positions, int(positions.max()) + 1)
        return apply_rope(q, cos, sin).transpose(1, 2)

    def rope(self, positions: torch.Tensor, below: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and half-negated sin for ``positions`` (all ``< below``), looked up in tables computed once (the same
        values, elementwise, as computing them per step: a dozen calls per decode step saved)."""
        t = self._rope
        if t is None or t[0].shape[0] < below:
            n = max(below, 2 * t[0].shape[0] if t is not None else 256)
            f = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq
            t = self._rope = rope_tables(f, self.dtype)  # (n, 1, hd) each
        return t[0][positions], t[1][positions]

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, for either weight form (a quantised table dequantises only these rows)."""
        return quant.embedding(ids, self.embed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (shared by every exit point)."""
        return self.lin(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.head)

    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes a layer weight takes per parameter as this engine holds it (Q4_1: 0.625, float32: 4): what the
        stats count as read when a unit runs."""
        w = self.layers[0]
        ts = [w.wqkv] if w.wqkv is not None else [w.wq, *w.wkv]
        ts += [w.wo, *w.wgu, w.wd]
        return sum(quant.nbytes(t) for t in ts) / sum(quant.logical_shape(t)[0] * quant.logical_shape(t)[1]
                                                      for t in ts)

    @property
    def head_bytes_per_param(self) -> float:
        n, k = quant.logical_shape(self.head)
        return quant.nbytes(self.head) / (n * k)

    def new_stats(self, record_tokens: bool = True) -> Stats:
        """Counters sized for this engine's weights (bytes per parameter of its layers and of its head)."""
        return Stats(self.cfg, weight_bytes_per_param=self.weight_bytes_per_param,
                     head_bytes_per_param=self.head_bytes_per_param, record_tokens=record_tokens)

    def head_flops(self, n: int) -> float:
        return 2.0 * n * self.cfg.hidden_size * self.cfg.vocab_size

    def exit_kv(self, first: int, rows: torch.Tensor, h: torch.Tensor, ctx: StepContext) -> None:
        """Write the K/V of layers ``first``..L-1 for tokens that leave the stack before layer ``first`` with frozen
        states ``h`` (n, D) (flat ``rows`` of the step): one batched projection instead of one small layer step per
        skipped layer. The math is the per-layer ``kv="compute"`` fill (each layer's own input norm, K norm and
        rotary embedding), so a token's K/V do not depend on when they are written; later layers then run with
        ``kv="filled"`` and spend nothing on these rows. Why: at batch 1 a skipped layer's K/V projection is a tiny
        matmul wrapped in a dozen small operations, which cost more than the weights they read."""
        if not rows.numel():
            return
        if ctx.cache.shrinks:
            raise PonderError("early exit's K/V filling cannot be combined with a KV-selection policy")
        c, eps = self.cfg, self.cfg.rms_norm_eps
        Hk, hd, L = self._Hk, self._hd, c.num_hidden_layers
        Lr, n = L - first, rows.numel()
        r, col = rows // ctx.T, rows % ctx.T + ctx.start
        cos, sin = self.rope(ctx.positions.reshape(-1)[rows], ctx.end)  # (n, 1, hd): broadcast over layers, heads
        st = self._exit_stack()
        if st is None:  # a large model: no stacked copy of the K/V weights; one layer at a time, still no planning
            for j in range(first, L):
                w = self.layers[j]
                kj, vj = row_kv(w, rms_norm(h, w.ln1, eps), cos, sin, Hk, hd, eps)
                ctx.cache.k[j][r, :, col], ctx.cache.v[j][r, :, col] = kj, vj
            return
        ln, wkv, bkv, kn = (t[first:] if t is not None else None for t in st)
        hn = rms_norm(h[None].expand(Lr, n, h.shape[-1]), ln[:, None, :], eps)  # (Lr, n, D): each layer's norm
        wt = wkv.transpose(1, 2)
        kv = torch.bmm(hn, wt) if bkv is None else torch.baddbmm(bkv[:, None, :], hn, wt)
        kv = kv.view(Lr, n, 2, Hk, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if kn is not None:
            k = rms_norm(k, kn[:, None, None, :], eps)
        k = apply_rope(k, cos, sin)
        ctx.cache.k[first:, r, :, col] = k.transpose(0, 1)
        ctx.cache.v[first:, r, :, col] = v.transpose(0, 1)

    EXIT_STACK_MAX_BYTES = 64 << 20  # above this, exit_kv does not keep a stacked copy of every layer's K/V weights

    def _exit_stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """Per-layer input norms, K|V weights, K|V biases and K norms stacked over layers (built on first use), or
        None when that copy would exceed ``EXIT_STACK_MAX_BYTES`` (a 7B model's would be ~0.5 GB)."""
        st = getattr(self, "_exit_kv_stack", None)
        if st is None:
            if self.quantised:  # block-quantised K/V weights have no batched product: one layer at a time
                return None
            ls = self.layers
            w0 = ls[0].wkv
            size = sum(t.numel() * t.element_size() for t in w0) * len(ls)
            if size > self.EXIT_STACK_MAX_BYTES:
                return None
            wkv = torch.stack([w.wkv[0] if len(w.wkv) == 1 else torch.cat(w.wkv) for w in ls])
            bkv = (torch.stack([w.bkv[0] if len(w.bkv) == 1 else torch.cat(w.bkv) for w in ls])
                   if ls[0].bkv is not None else None)
            kn = torch.stack([w.k_norm for w in ls]) if ls[0].k_norm is not None else None
            st = self._exit_kv_stack = (torch.stack([w.ln1 for w in ls]), wkv, bkv, kn)
        return st

    # ---- the forward pass -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, planner: Planner | None = None,
                stats: Stats | None = None, logits: str | None = "all", phase: str = "prefill",
                first_layer: int = 0, last_layer: int | None = None, hidden: torch.Tensor | None = None
                ) -> ForwardOutput:
        """Run layers [first_layer, last_layer) on ``ids`` (B, T), appending to ``cache``.

        ``hidden`` replaces the embedding (to resume from a saved exit state); ``logits`` is "all", "last" or None.
        """
        B, T = ids.shape
        L = self.cfg.num_hidden_layers
        last_layer = L if last_layer is None else last_layer
        if cache is None:
            cache = self.new_cache(B, T)
        if first_layer == 0 and hidden is None:
            start, end = cache.reserve(T)
        else:  # continuing a step whose columns were reserved by the earlier call
            start, end = cache.length - T, cache.length
        positions = cache.positions(start, end)
        cos, sin = self.rope(positions, end + cache.pos_extra)
        x = self.embedding(ids) if hidden is None else hidden
        ctx = StepContext(self, B, T, start, end, positions, phase, stats, cache)
        if stats is not None and first_layer == 0:
            stats.begin_step(B, T, start)
        base_mask = self._mask(cache.valid, start, end) if cache.padded or T > 1 else None
        causal = not cache.padded and T > 1 and start == 0
        cut = cache.shrinks and planner is not None
        low_allow = self._low_allow(cache, start, end, base_mask) if cache.low else None
        wide_allow = self._wide_allow(cache, start, end) if cache.wide else None
        for i in range(first_layer, last_layer):
            plan = planner.layer(i, x, ctx) if planner is not None else None
            x_in = x
            if plan is not None and plan.attn is not None:
                mask, is_causal = None, False  # planned attention rows build their own mask (or none runs)
            elif i in cache.holes:
                mask, is_causal = self._mask(cache.holes[i], start, end), False
            else:
                mask, is_causal = (None, True) if causal else (base_mask, False)
            if plan is None or plan.dense:
                x = self._dense_layer(i, x, cos, sin, cache, start, end, mask, is_causal, low_allow, wide_allow)
                if stats is not None:
                    stats.layer(i, None, None, None, None)
            else:
                x = self._planned_layer(i, x, plan, cos, sin, cache, start, end, mask, is_causal, stats)
            if planner is not None:
                planner.observe(i, x, ctx)
            if cut:
                kept = planner.evict(i, x_in, ctx)  # type: ignore[union-attr]
                if kept is not None:
                    cache.keep(i, *kept)  # type: ignore[attr-defined]
        if cut and last_layer == L:
            cache.commit()  # type: ignore[attr-defined]
        if stats is not None and last_layer == L:
            stats.end_step()
        out = None
        if logits in ("all", "last"):
            known = planner.known_logits() if planner is not None and last_layer == L else None
            out = self._final_logits(x, logits == "last", known, stats)
        return ForwardOutput(out, x)

    def _final_logits(self, x: torch.Tensor, last: bool, known: tuple[torch.Tensor, torch.Tensor] | None,
                      stats: Stats | None) -> torch.Tensor:
        """Logits of every token (or each row's last), reusing those a planner already computed from the very same
        final states (an exited token's check): the head is the most expensive single matmul at batch 1."""
        B, T, D = x.shape
        sel = x[:, -1] if last else x
        want = sel.shape[0] * (1 if last else T)
        if known is None:
            out = self.logits(sel)
            n = want
        else:
            rows, lg = known
            flat = (torch.arange(B, device=x.device) * T + T - 1) if last else torch.arange(B * T, device=x.device)
            slot = torch.full((B * T,), -1, dtype=torch.long, device=x.device)
            slot[rows] = torch.arange(rows.numel(), device=x.device)
            idx = slot[flat]
            have = idx >= 0
            out = lg.new_empty(want, self.cfg.vocab_size)
            out[have] = lg[idx[have]]
            miss = (~have).nonzero().squeeze(1)
            n = miss.numel()
            if n:
                out[miss] = self.logits(x.reshape(B * T, D)[flat[miss]])
            out = out.view(*sel.shape[:-1], self.cfg.vocab_size)
        if stats is not None:
            stats.add_head(n, want)
        return out

    @staticmethod
    def _mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """(B, end - start, end) boolean for the queries at columns [start, end): causal, valid keys, and always the
        query itself (keeps padding rows finite). ``attend`` adds the head dimension."""
        kcol = torch.arange(end, device=valid.device)
        qcol = torch.arange(start, end, device=valid.device)
        causal = kcol[None, :] <= qcol[:, None]
        own = kcol[None, :] == qcol[:, None]
        return (causal[None] & valid[:, None, :end]) | own[None]

    # ---- one layer ------------------------------------------------------------------------------------------
    def _dense_layer(self, i, x, cos, sin, cache, start, end, mask, is_causal, low_allow=None, wide_allow=None):
        w = self.layers[i]
        if i in cache.low:
            x = self._attn_with_low(i, w, x, cos, sin, cache, start, end, low_allow)
        elif i in cache.wide:
            x = self._attn_with_wide(i, w, x, cos, sin, cache, start, end, mask, is_causal, wide_allow)
        else:
            x = self.steps.attn(w, x, cos, sin, cache.k[i], cache.v[i], start, end, mask, is_causal)
        return self.steps.ffn(w, x.view(-1, x.shape[-1])).view(x.shape)  # 2-D: a 3-D linear reshapes around it

    def _planned_layer(self, i, x, plan: LayerPlan, cos, sin, cache: KVCache, start, end, mask, is_causal,
                       stats: Stats | None):
        """Attention for the rows in ``plan.attn`` (every row when None), the K/V the other rows leave behind, then
        the FFN for the rows in ``plan.ffn``; a row outside both sets is not computed at all."""
        w = self.layers[i]
        B, T, D = x.shape
        a, f = plan.attn, plan.ffn
        if i in cache.low or i in cache.wide:
            raise PonderError("a depth or selection plan cannot run on a cache with low-precision slots or "
                              "head budgets; run that KV policy alone")
        if self._compactable(plan, B, T, start):
            return self._compact_layer(i, w, x, plan.attn, cos, sin, cache, stats)
        kv_rows = attn_ctx = None
        if a is None and plan.keys is not None:
            x = self._selected_attn(i, w, x, plan.keys, plan.keys_ok, cos, sin, cache, start, end)
        elif a is None:
            x = self.steps.attn(w, x, cos, sin, cache.k[i], cache.v[i], start, end, mask, is_causal)
        elif a.numel() or plan.kv != "filled":
            h_a, kv_rows = self._write_kv(i, w, x, a, plan.kv, cos, sin, cache, start, end)
            if a.numel():
                x, attn_ctx = self._attn_rows(i, w, x, a, h_a, cos, sin, cache, start, end)
        x = self._ffn_rows(w, x, f)
        if plan.replace is not None:  # a healed drop: every row takes the trained stand-in for the layer
            x = x + plan.replace(x.view(B * T, D)).view(B, T, D)
            if stats is not None:
                stats.add_overhead(B * T * plan.replace.flops_per_row())
        if stats is not None:
            stats.layer(i, a, kv_rows, f, attn_ctx)
        return x

    @staticmethod
    def _compactable(plan: LayerPlan, B: int, T: int, start: int) -> bool:
        """A fresh one-row prefill where the same rows run attention and FFN and the others leave nothing: the
        layer is then plain causal attention over those rows alone (every other key of the layer is a hole), so
        it can run as a dense layer on the compacted rows (the fused causal kernel) instead of the masked path."""
        a = plan.attn
        return (B == 1 and T > 1 and start == 0 and plan.kv == "none" and a is not None and plan.ffn is not None
                and plan.replace is None and 0 < a.numel() < T and (plan.ffn is a or torch.equal(plan.ffn, a)))

    def _compact_layer(self, i: int, w: LayerWeights, x: torch.Tensor, a: torch.Tensor, cos, sin, cache: KVCache,
                       stats: Stats | None) -> torch.Tensor:
        """The layer for the columns ``a`` of a one-row prefill, as a dense causal layer on those rows; their K/V
        go to their own columns, every other column of the layer becomes a hole. The same math as the masked
        path (``_attn_rows`` with ``kv="none"``), through the kernels a dense prefill uses."""
        n, Hk, hd = a.numel(), self._Hk, self._hd
        xa = x[:, a]
        kb = x.new_empty(1, Hk, n, hd)
        vb = x.new_empty(1, Hk, n, hd)
        xa = self.steps.attn(w, xa, cos[:, a].contiguous(), sin[:, a].contiguous(), kb, vb, 0, n, None, True)
        xa = self.steps.ffn(w, xa.view(n, -1)).view(1, n, -1)
        cache.k[i][:, :, a], cache.v[i][:, :, a] = kb, vb
        off = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        off[a] = False
        cols = off.nonzero().squeeze(1)
        cache.punch(i, torch.zeros_like(cols), cols)
        if stats is not None:
            stats.layer(i, a, a, a, n * (n + 1) / 2)
        return x.index_copy(1, a, xa)

    def _write_kv(self, i: int, w: LayerWeights, x: torch.Tensor, a: torch.Tensor, kv: str, cos, sin,
                  cache: KVCache, start: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This layer's cache columns for the step: the attending rows' K/V, and for the others what ``kv`` says
        (computed from their incoming state, already filled, copied from the layer below, or punched out). Returns
        the attending rows' normed states and the row set the stats count as leaving K/V behind."""
        if kv == "compute":  # every row leaves its own K/V: project them all, attending rows reuse the normed states
            h = self.steps.kv(w, x, cos, sin, cache.k[i], cache.v[i], start, end)
            return (h[a] if a.numel() else None), None
        B, T, D = x.shape
        N, hd, eps = B * T, self._hd, self.cfg.rms_norm_eps
        xf = x.reshape(N, D)
        h_a = None
        if a.numel():
            h_a = rms_norm(xf[a], w.ln1, eps)
            rows, cols = a // T, a % T + start
            cache.k[i][rows, :, cols], cache.v[i][rows, :, cols] = row_kv(
                w, h_a, cos.reshape(N, 1, hd)[a], sin.reshape(N, 1, hd)[a], self._Hk, hd, eps)
        if kv == "filled":  # the other rows' K/V are already in place
            return h_a, None
        if h_a is None:  # no row attends: the step's whole column block is copied or left empty
            if kv == "copy" and i > 0:
                cache.k[i][:, :, start:end] = cache.k[i - 1][:, :, start:end]
                cache.v[i][:, :, start:end] = cache.v[i - 1][:, :, start:end]
            else:
                cache.punch_columns(i, start, end)
            return None, a
        off = torch.ones(N, dtype=torch.bool, device=x.device)
        off[a] = False
        idx = off.nonzero().squeeze(1)
        if idx.numel() and kv == "copy" and i > 0:
            rr, cc = idx // T, idx % T + start
            cache.k[i][rr, :, cc] = cache.k[i - 1][rr, :, cc]
            cache.v[i][rr, :, cc] = cache.v[i - 1][rr, :, cc]
        elif idx.numel():
            cache.punch(i, idx // T, idx % T + start)
        return h_a, a

    def _attn_rows(self, i: int, w: LayerWeights, x: torch.Tensor, a: torch.Tensor, h_a: torch.Tensor, cos, sin,
                   cache: KVCache, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for the rows ``a`` (their normed states ``h_a``), packed per batch row so only present rows'
        keys are read; returns x with their updates added, and the attended-key count."""
        B, T, D = x.shape
        H, hd, na = self._H, self._hd, a.numel()
        q = w.q(h_a).view(na, H, hd)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, self.cfg.rms_norm_eps)
        q = apply_rope(q, cos.reshape(B * T, 1, hd)[a], sin.reshape(B * T, 1, hd)[a])
        rows, cols = a // T, a % T + start
        urows, inv, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        nr, tq = urows.numel(), int(counts.max())
        slot = torch.arange(na, device=a.device) - (counts.cumsum(0) - counts)[inv]
        qp = q.new_zeros(nr, tq, H, hd)
        qp[inv, slot] = q
        qcol = torch.full((nr, tq), -1, dtype=torch.long, device=a.device)
        qcol[inv, slot] = cols
        if nr == cache.batch:
            k, v, valid = cache.k[i][:, :, :end], cache.v[i][:, :, :end], cache.layer_valid(i)[:, :end]
        else:
            k, v = cache.k[i][urows, :, :end], cache.v[i][urows, :, :end]
            valid = cache.layer_valid(i)[urows, :end]
        kcol = torch.arange(end, device=a.device)
        allowed = (kcol <= qcol[..., None]) & (valid[:, None, :] | (kcol == qcol[..., None]))
        allowed |= (qcol[..., None] < 0) & (kcol == 0)  # empty packing slots: keep them finite, discard later
        o = attend(qp.transpose(1, 2), k, v, allowed, False)
        o = o.transpose(1, 2)[inv, slot].reshape(na, H * hd)
        x = x.reshape(B * T, D).index_add(0, a, self.lin(o, w.wo)).view(B, T, D)
        return x, allowed[inv, slot].sum().float()

    def _selected_attn(self, i: int, w: LayerWeights, x: torch.Tensor, keys: torch.Tensor, ok: torch.Tensor, cos,
                       sin, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """Attention of a one-token step over the cache columns ``keys`` (B, Hk, k) that count (``ok``) plus the
        token itself: only those keys and values are read (per-query token selection). The token's own K/V are
        written to the cache as usual."""
        B, T, D = x.shape
        if T != 1:
            raise ValueError("selective attention serves one-token steps; feed longer inputs one token at a time")
        H, Hk, hd = self._H, self._Hk, self._hd
        q, k, v = self._step_qkv(i, w, x, cos, sin, cache, start, end)  # k, v (B, Hk, 1, hd)
        e = keys[..., None].expand(*keys.shape, hd)
        kk = torch.cat([cache.k[i].gather(2, e), k], 2)  # (B, Hk, n + 1, hd)
        vv = torch.cat([cache.v[i].gather(2, e), v], 2)
        G = H // Hk
        s = torch.matmul(q.reshape(B, Hk, G, hd), kk.transpose(-1, -2)) * hd ** -0.5  # (B, Hk, G, n + 1)
        allow = torch.cat([ok, ok.new_ones(B, Hk, 1)], 2)
        p = s.masked_fill(~allow[:, :, None, :], float("-inf")).softmax(-1)
        o = torch.matmul(p, vv).reshape(B, 1, H * hd)
        return x + self.lin(o, w.wo)

    def _step_qkv(self, i: int, w: LayerWeights, x: torch.Tensor, cos, sin, cache: KVCache, start: int, end: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's rotated queries (B, H, T, hd) and its K, V (B, Hk, T, hd), the latter written to layer
        ``i``'s cache columns [start, end): where every attention route outside ``steps`` begins."""
        B, T, _ = x.shape
        Hk, hd = self._Hk, self._hd
        q, k, v = rotated_qkv(w, x, cos, sin, self._H, Hk, hd, self.cfg.rms_norm_eps)
        k, v = k.transpose(1, 2), v.view(B, T, Hk, hd).transpose(1, 2)
        cache.k[i][:, :, start:end], cache.v[i][:, :, start:end] = k, v
        return q.transpose(1, 2), k, v

    def _low_allow(self, cache: KVCache, start: int, end: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """What the queries at [start, end) may read of the demoted slots then the columns (B, T, m + end), once
        per step; None when that is everything (one new token, no padding, no filler slot)."""
        lv = cache.low_valid
        assert lv is not None
        if mask is None and end - start == 1 and bool(lv.all()):
            return None
        full = mask if mask is not None else self._mask(cache.valid, start, end)
        return torch.cat([lv[:, None, :].expand(full.shape[0], end - start, -1), full], 2)

    def _wide_allow(self, cache: KVCache, start: int, end: int) -> torch.Tensor | None:
        """What the queries at [start, end) may read of the wide heads' columns (B, T, end + off), once per step;
        None when that is everything (one new token and no padding)."""
        wv, off = cache.wide_valid, cache.wide_off
        assert wv is not None
        if end - start == 1 and bool(wv[:, :end + off].all()):
            return None
        return self._mask(wv, start + off, end + off)

    def _attn_with_wide(self, i: int, w: LayerWeights, x: torch.Tensor, cos, sin, cache: KVCache, start: int,
                        end: int, mask: torch.Tensor | None, is_causal: bool, allow: torch.Tensor | None
                        ) -> torch.Tensor:
        """The attention half of a layer whose wide heads keep every token: every head over the cut columns, then
        the wide heads' query groups again over their own columns (replacing those heads' outputs; the wasted part
        is a window's worth of their attention)."""
        B, T, D = x.shape
        qt, kt, vt = self._step_qkv(i, w, x, cos, sin, cache, start, end)
        wd, off = cache.wide[i], cache.wide_off
        wd.k[:, :, start + off:end + off], wd.v[:, :, start + off:end + off] = kt[:, wd.heads], vt[:, wd.heads]
        o = attend(qt, cache.k[i][:, :, :end], cache.v[i][:, :, :end], mask, is_causal)
        o[:, wd.qheads] = attend(qt[:, wd.qheads], wd.k[:, :, :end + off], wd.v[:, :, :end + off], allow, False)
        return x + self.lin(o.transpose(1, 2).reshape(B, T, self._H * self._hd), w.wo)

    def _attn_with_low(self, i: int, w: LayerWeights, x: torch.Tensor, cos, sin, cache: KVCache, start: int,
                       end: int, allow: torch.Tensor | None) -> torch.Tensor:
        """The attention half over the layer's demoted slots (read packed, or dequantised for this step only by
        the reference halves) and its full-precision columns [0, end). The demoted tokens all precede every
        column, so each query may read every real one of them."""
        B, T, D = x.shape
        qt, _, _ = self._step_qkv(i, w, x, cos, sin, cache, start, end)
        o = self.steps.attend_low(qt, cache.k[i][:, :, :end], cache.v[i][:, :, :end], cache.low[i], allow)
        return x + self.lin(o.transpose(1, 2).reshape(B, T, self._H * self._hd), w.wo)

    def _ffn_rows(self, w: LayerWeights, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        """The FFN for the rows ``f`` (every row when None), gathered, run and added back."""
        if f is not None and not f.numel():
            return x
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        if f is None or f.numel() == B * T:  # every row runs it: no gather, no scatter (x + m either way, same bits)
            return self.steps.ffn(w, xf).view(B, T, D)
        return xf.index_add(0, f, w.mlp(rms_norm(xf[f], w.ln2, self.cfg.rms_norm_eps))).view(B, T, D)
