"""BERT-family encoders (BERT, MiniLM, RoBERTa-style position offsets): the module definition.

What is here: the prepared (fused) weights and the per-layer math as small pure functions. The token-reducing
forward pass that strings them together lives in :mod:`ponder.encoders.engine`; keeping the math apart from the
orchestration is what lets one layer function serve dense encoding, pruning, merging and early exit. The
configuration is :mod:`.bert_config`; reading a sentence-transformers / HF folder into these weights,
:mod:`.bert_loader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .bert_config import _ACTIVATIONS, EncoderConfig


@dataclass
class BertLayer:
    """One post-LayerNorm encoder layer; q|k|v fused so a layer is one projection, one attention, one FFN."""

    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]

    @property
    def wkv(self) -> torch.Tensor:
        return self.wqkv[self.wo.shape[0]:]

    @property
    def bkv(self) -> torch.Tensor:
        return self.bqkv[self.wo.shape[0]:]


@dataclass
class BertWeights:
    cfg: EncoderConfig
    word: torch.Tensor
    pos: torch.Tensor
    tok_type: torch.Tensor
    ln_emb: tuple[torch.Tensor, torch.Tensor]
    layers: list[BertLayer] = field(default_factory=list)


# ---- the per-layer math (pure functions over prepared weights) ----------------------------------------------------
def embed_tokens(W: BertWeights, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Word + absolute position + token-type-0 embeddings, then LayerNorm. ids (B, T)."""
    cfg = W.cfg
    T = ids.shape[1]
    if cfg.position_offset:  # RoBERTa: positions count non-padding tokens, starting after the padding index
        v = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
        pos = (v.long().cumsum(1) * v.long()) + cfg.pad_token_id
        pe = F.embedding(pos, W.pos)
    else:
        pe = W.pos[:T]
    x = F.embedding(ids, W.word) + pe + W.tok_type[0]
    return F.layer_norm(x, (cfg.hidden_size,), *W.ln_emb, cfg.layer_norm_eps)


def key_bias(valid: torch.Tensor | None, size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias over keys (B, 1, 1, K): -inf on padding, log(size) for merged tokens (ToMe's
    proportional attention: a token standing for s originals gets the attention s copies would get)."""
    if valid is None and size is None:
        return None
    if size is not None:
        b = size.clamp_min(1e-6).log().to(dtype)
        if valid is not None:
            b = b.masked_fill(~valid, float("-inf"))
    else:
        b = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return b[:, None, None, :]


def split_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, n, D = t.shape
    return t.view(B, n, H, D // H).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, want_probs: bool | str
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention (B, H, n, hd) x (B, H, m, hd). With ``want_probs`` the probabilities are computed
    explicitly (a scoring layer of token pruning needs them); ``want_probs="first"`` keeps the fused kernel and
    adds only the first query's ([CLS]'s) probabilities (B, H, 1, m); otherwise the fused SDPA kernel runs alone."""
    if want_probs == "first":
        s = (q[:, :, :1] @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        p = (s + bias).softmax(-1) if bias is not None else s.softmax(-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), p
    if not want_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias
    p = s.softmax(-1)
    return p @ v, p


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, n, hd = o.shape
    return o.transpose(1, 2).reshape(B, n, H * hd)


def attn_block(W: BertWeights, i: int, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None,
               want_probs: bool | str = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Self-attention half of layer ``i`` for the query rows ``x`` (B, n, D); ``ctx`` (B, m, D) are extra rows that
    are only keys/values (frozen tokens). Returns (LN1 output for x, probs or None, keys of x (B, n, D))."""
    cfg, w = W.cfg, W.layers[i]
    H, D = cfg.num_attention_heads, cfg.hidden_size
    q, k, v = F.linear(x, w.wqkv, w.bqkv).split(D, dim=-1)
    kx = k
    if ctx is not None and ctx.shape[1]:
        kc, vc = F.linear(ctx, w.wkv, w.bkv).split(D, dim=-1)
        k, v = torch.cat([k, kc], 1), torch.cat([v, vc], 1)
    o, p = attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), bias, want_probs)
    h = F.layer_norm(x + F.linear(merge_heads(o), w.wo, w.bo), (D,), *w.ln1, cfg.layer_norm_eps)
    return h, p, kx


def ffn_block(W: BertWeights, i: int, h: torch.Tensor) -> torch.Tensor:
    cfg, w = W.cfg, W.layers[i]
    act = _ACTIVATIONS[cfg.hidden_act]
    return F.layer_norm(h + F.linear(act(F.linear(h, w.w1, w.b1)), w.w2, w.b2), (cfg.hidden_size,), *w.ln2,
                        cfg.layer_norm_eps)


def pool(tokens: torch.Tensor, weight: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers' pooling over (B, T, D) with per-position weights (B, T) (the attention mask, or
    fewer ones where a policy dropped a token from pooling)."""
    w = weight.to(tokens.dtype)
    if mode == "cls":
        out = tokens[:, 0]
    elif mode == "max":
        out = tokens.masked_fill(w[..., None] <= 0, -1e9).max(1).values
    else:
        s = (tokens * w[..., None]).sum(1)
        n = w.sum(1, keepdim=True).clamp_min(1e-9)
        out = s / (n if mode == "mean" else n.sqrt())
    return F.normalize(out, p=2, dim=1) if normalize else out
