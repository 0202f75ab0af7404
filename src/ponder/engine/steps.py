"""The layer halves a forward step is built from, in two implementations chosen once when an engine is built.

``PythonSteps`` is the reference: one general route per half (any number of new tokens per row, every model
family), written to be read. ``FusedSteps`` serves the same calls from the compiled halves in ``fused.cpp`` where
they apply (float32 or bf16 on CPU, fused q|k|v and gate|up weights, no q/k norms for attention), with their
one-token specialisations, and defers to the reference otherwise; it computes the same bits (``tests/test_fused.py``
holds it to that). Why a compiled half at all, and why not ``torch.compile``: see ``engine/fused.py`` and the
measurement in ``benchmarks/compile_vs_fused.py``.

The forward loop (``engine/forward.py``) only ever calls ``steps.attn``, ``steps.kv`` and ``steps.ffn``; the
planned-layer pieces use the pure functions below (``attend``, ``row_kv``).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..models.config import ModelConfig
from ..models.llama import apply_rope, rms_norm
from . import fused

if TYPE_CHECKING:
    from .forward import LayerWeights
    from .lowbits import LowSlots

SMALL_TQ = 16  # up to this many queries per row, attention runs as two batched matmuls instead of SDPA


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
           ) -> torch.Tensor:
    """q (B, H, Tq, hd) against k, v (B, Hk, Tk, hd); mask (B, Tq, Tk) boolean or None."""
    if mask is not None:
        mask = mask[:, None]
    B, H, Tq, hd = q.shape
    Hk = k.shape[1]
    if Tq == 1 or (mask is not None and Tq <= SMALL_TQ):
        # Decode, or a few queries per row (speculative verification): two small batched matmuls beat the fused
        # SDPA kernel's set-up cost on CPU (measured ~24 vs ~57 us at 8 heads x 100 keys, one query). Query heads
        # are grouped onto their KV head; (batch, KV head) merge into one matmul batch dimension without a copy,
        # even for a cache slice.
        Tk, G = k.shape[2], H // Hk
        s = torch.bmm(q.reshape(B * Hk, G * Tq, hd), k.reshape(B * Hk, Tk, hd).transpose(1, 2)).mul_(hd ** -0.5)
        if mask is not None:
            s = s.view(B, Hk, G, Tq, Tk).masked_fill_(~mask[:, :, None], float("-inf")).view(B * Hk, G * Tq, Tk)
        return torch.bmm(s.softmax(-1), v.reshape(B * Hk, Tk, hd)).view(B, H, Tq, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          enable_gqa=H != Hk)


def row_kv(w: LayerWeights, hn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, Hk: int, hd: int, eps: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """K (K-normed, rotated) and V, each (n, Hk, hd), of one layer for normed rows ``hn`` (n, D) at rotary
    ``cos``/``sin`` (n, 1, hd): what a row leaves in the cache, whether it runs the layer or only fills it."""
    n = hn.shape[0]
    k, v = w.kv(hn)
    k = k.view(n, Hk, hd)
    if w.k_norm is not None:
        k = rms_norm(k, w.k_norm, eps)
    return apply_rope(k, cos, sin), v.reshape(n, Hk, hd)


def rotated_qkv(w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, Hk: int, hd: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries (B, T, H, hd) and keys (B, T, Hk, hd), normed where the family norms them and rotated, and
    its values (B, T, Hk * hd), for input states x (B, T, D): what every attention route starts from."""
    B, T, _ = x.shape
    q, k, v = w.qkv(rms_norm(x, w.ln1, eps))
    q, k = q.view(B, T, H, hd), k.view(B, T, Hk, hd)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class PythonSteps:
    """The reference halves."""

    name = "python"

    def __init__(self, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.H, self.Hk, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def attn(self, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ck: torch.Tensor,
             cv: torch.Tensor, start: int, end: int, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The attention half for every row of x (B, T, D), residual added; writes cache columns [start, end)."""
        B, T, _ = x.shape
        Hk, hd = self.Hk, self.hd
        q, k, v = rotated_qkv(w, x, cos, sin, self.H, Hk, hd, self.eps)
        ck[:, :, start:end] = k.transpose(1, 2)
        cv[:, :, start:end] = v.reshape(B, T, Hk, hd).transpose(1, 2)
        o = attend(q.transpose(1, 2), ck[:, :, :end], cv[:, :, :end], mask, is_causal)
        return x + w.lin(o.transpose(1, 2).reshape(B, T, w.qdim), w.wo)

    def kv(self, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ck: torch.Tensor,
           cv: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Every row's K/V only, for x (B, T, D): written at columns [start, end); returns the normed rows (N, D)
        (the rows that do attend reuse them)."""
        B, T, D = x.shape
        N, Hk, hd = B * T, self.Hk, self.hd
        h = rms_norm(x.reshape(N, D), w.ln1, self.eps)
        k, v = row_kv(w, h, cos.reshape(N, 1, hd), sin.reshape(N, 1, hd), Hk, hd, self.eps)
        ck[:, :, start:end] = k.view(B, T, Hk, hd).transpose(1, 2)
        cv[:, :, start:end] = v.view(B, T, Hk, hd).transpose(1, 2)
        return h

    def ffn(self, w: LayerWeights, xf: torch.Tensor) -> torch.Tensor:
        """The FFN half with its residual, for rows xf (N, D)."""
        return xf + w.mlp(rms_norm(xf, w.ln2, self.eps))

    def attend_low(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, low: LowSlots,
                   allow: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, Tq, hd) over a layer's demoted slots then its full-precision k, v (B, Hk, Tk, hd); ``allow``
        (B, Tq, m + Tk), None: every key. The reference dequantises the slots for this call."""
        lk, lv = low.values(k.dtype)
        return attend(q, torch.cat([lk, k], 2), torch.cat([lv, v], 2), allow, False)


class FusedSteps(PythonSteps):
    """The compiled halves. Why the one-token specialisation: at batch 1 the attention half is ~20 small calls
    whose fixed costs outweigh the 0.8 MB of weights they read."""

    name = "cpp"

    def __init__(self, cfg: ModelConfig, mod: ModuleType):
        super().__init__(cfg)
        self.mod = mod

    def attn(self, w, x, cos, sin, ck, cv, start, end, mask, is_causal):
        if w.q_norm is not None:  # q/k norms: the reference route
            return super().attn(w, x, cos, sin, ck, cv, start, end, mask, is_causal)
        B, T, D = x.shape
        if T == 1:
            return self.mod.decode_attn(x.view(B, D), w.ln1, self.eps, w.wqkv, w.bqkv, w.wo, cos, sin, ck, cv,
                                        start, end, mask, self.H, self.Hk, self.hd).view(B, 1, D)
        return self.mod.attn_rows(x, w.ln1, self.eps, w.wqkv, w.bqkv, w.wo, cos, sin, ck, cv, start, end, mask,
                                  is_causal, self.H, self.Hk, self.hd, SMALL_TQ)

    def kv(self, w, x, cos, sin, ck, cv, start, end):
        B, T, D = x.shape
        if T > 1:
            return super().kv(w, x, cos, sin, ck, cv, start, end)
        return self.mod.decode_kv(x.view(B, D), w.ln1, self.eps, w.wkv[0], w.bkv[0] if w.bkv else None, w.k_norm,
                                  cos, sin, ck, cv, start, self.Hk, self.hd)

    def ffn(self, w, xf):
        return self.mod.ffn(xf, w.ln2, self.eps, w.wgu[0], w.wd)

    def attend_low(self, q, k, v, low, allow):
        """A few queries per row read the packed slots in place (``packed.cpp``); softmax over both parts."""
        B, H, Tq, hd = q.shape
        if q.dtype != torch.float32 or Tq > SMALL_TQ:
            return super().attend_low(q, k, v, low, allow)
        Hk, Tk = k.shape[1], k.shape[2]
        G, m, N = H // Hk, low.k.q.shape[2], B * Hk
        qg = q.reshape(N, G * Tq, hd)
        kp, vp = low.k, low.v
        s_low = self.mod.packed_qk(qg, kp.q.view(N, m, -1), kp.scale.view(N, m, -1), kp.zero.view(N, m, -1),
                                   kp.bits, kp.group)
        s = torch.cat([s_low, torch.bmm(qg, k.reshape(N, Tk, hd).transpose(1, 2))], 2).mul_(hd ** -0.5)
        if allow is not None:
            s = s.view(B, Hk, G, Tq, m + Tk).masked_fill_(~allow[:, None, None], float("-inf")).view(N, G * Tq, -1)
        p = s.softmax(-1)
        o = self.mod.packed_pv(p[..., :m], vp.q.view(N, m, -1), vp.scale.view(N, m, -1), vp.zero.view(N, m, -1),
                               vp.bits, vp.group)
        return o.add_(torch.bmm(p[..., m:], v.reshape(N, Tk, hd))).view(B, H, Tq, hd)


def compiled(on_cpu: bool, fuse: bool) -> ModuleType | None:
    """The compiled module an engine may use: CPU only (the only device it is tested on), and only for weights the
    engine owns (``fuse``; a borrowed transformers model keeps torch's own products)."""
    return fused.load() if on_cpu and fuse else None


def choose(cfg: ModelConfig, layers: list[LayerWeights], mod: ModuleType | None) -> PythonSteps:
    """The halves for an engine: compiled when the module loaded and the weights have the fused q|k|v and gate|up
    layout the compiled halves are written for, the reference otherwise."""
    if mod is not None and layers and layers[0].wqkv is not None and len(layers[0].wgu) == 1:
        return FusedSteps(cfg, mod)
    return PythonSteps(cfg)
