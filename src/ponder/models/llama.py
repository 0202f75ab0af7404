"""The Llama-family decoder as plain tensors and small functions.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` exactly, so a checkpoint folder loads by name and a
transformers model can lend its tensors without a copy. The module's own ``forward`` is the dense, full-sequence
pass used for training; inference goes through ``ponder.engine.forward``, which reads the same weights but runs
only what an execution plan asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 like transformers, so bf16/fp16 runs agree with it. ``sum / n`` is what ``mean`` computes
    # (same bits) in two cheap calls instead of one dearer one; conversions are skipped when there is nothing to
    # convert. At batch-1 decode this runs 25 times per token, where each call's fixed cost is what counts.
    f32 = x.dtype == torch.float32
    xf = x if f32 else x.float()
    r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).div_(x.shape[-1]).add_(eps))
    y = xf * r
    return (y if f32 else y.to(x.dtype)) * w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., heads, head_dim); cos/sin broadcast as (..., 1, head_dim), with ``sin``'s first half negated (as
    ``rope`` returns it). ``rotate_half(x) * sin`` is then ``roll(x) * sin``, bit for bit: one call instead of four."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def rope_tables(f: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and half-negated sin for rotation angles ``f`` (..., head_dim / 2), each (..., 1, head_dim)."""
    c, s = f.cos(), f.sin()
    return torch.cat((c, c), -1)[..., None, :].to(dtype), torch.cat((-s, s), -1)[..., None, :].to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=b)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=b)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """Weights of a Llama-family causal LM under Hugging Face names, plus a dense training forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions of any shape, returned as (*positions.shape, 1, head_dim); see
        ``apply_rope``."""
        return rope_tables(positions.to(torch.float32)[..., None] * self.inv_freq, dtype)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> LlamaModel:
        """GPT-2 style init with residual projections scaled by depth, so deep small models train stably."""
        g = torch.Generator().manual_seed(seed)
        resid_std = std / (2 * self.config.num_hidden_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def forward(self, input_ids: torch.Tensor, replace: dict | None = None, gates: Callable | None = None
                ) -> torch.Tensor:
        """Dense causal forward over whole sequences (training and reference); returns logits (B, T, V).
        ``replace``: layer index -> a function of the residual state giving that layer's update instead (a healed
        layer drop's stand-ins, trained through this forward). ``gates(i, x)``: from layer ``i``'s input, the
        (B, T, 1) factors its attention and FFN updates are multiplied by, or None for 1 (a router in training:
        a 0/1 gate is the skip the engine executes; K/V are projected for every token either way, as the engine's
        ``kv="compute"`` leaves them)."""
        cfg = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(torch.arange(T, device=input_ids.device), x.dtype)
        H, Hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for i, layer in enumerate(self.model.layers):
            if replace is not None and i in replace:
                x = x + replace[i](x)
                continue
            ga, gf = gates(i, x) if gates is not None else (None, None)
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, T, H, hd)
            k = a.k_proj(h).view(B, T, Hk, hd)
            v = a.v_proj(h).view(B, T, Hk, hd)
            if cfg.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=H != Hk
            )
            u = a.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))
            x = x + (u if ga is None else ga * u)
            m = layer.mlp(layer.post_attention_layernorm(x))
            x = x + (m if gf is None else gf * m)
        x = self.model.norm(x)
        return F.linear(x, self.head_weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
