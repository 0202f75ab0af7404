"""Counters filled where the work happens, never inferred from a policy's intent.

A policy cannot claim a saving it did not make: the engine adds to these counters only when it actually runs a
matrix multiply over some rows, or reads a unit's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.config import ModelConfig

ATTN, FFN, KV = 1, 2, 4  # bits of the per-token unit map


@dataclass
class Stats:
    cfg: ModelConfig
    weight_bytes_per_param: float = 4  # layer weights (Q4_1: 0.625)
    record_tokens: bool = True
    head_bytes_per_param: float | None = None  # the LM head's, when it is stored differently (None: the layers')
    flops: float = 0.0  # executed per-token layer FLOPs (projections, attention core, FFN)
    dense_flops: float = 0.0  # what a dense model would have spent on the same tokens
    overhead_flops: float = 0.0  # policy-side work: extra LM-head calls, routers, similarity checks
    weight_bytes: float = 0.0  # layer weights read (a unit's weights are read once per step if any row ran it)
    dense_weight_bytes: float = 0.0
    head_flops: float = 0.0  # final norm + LM head on the rows whose logits were asked for
    head_bytes: float = 0.0
    dense_head_flops: float = 0.0  # the same for dense (which computes every requested row's logits)
    dense_head_bytes: float = 0.0
    overhead_bytes: float = 0.0  # weights a policy reads for its own decisions (an exit check reads the LM head)
    tokens: int = 0
    steps: int = 0
    unit_maps: list[torch.Tensor] = field(default_factory=list)  # per step: (B, T, L) uint8 of ATTN|FFN|KV bits

    # ---- called by the engine --------------------------------------------------------------------------------------
    def begin_step(self, B: int, T: int, start: int) -> None:
        self.steps += 1
        self.tokens += B * T
        self._bt = (B, T)
        self._ctx_sum = B * (T * start + T * (T + 1) // 2)  # sum over new tokens of keys attended (causal)
        self._map = (torch.full((B, T, self.cfg.num_hidden_layers), ATTN | FFN, dtype=torch.uint8)
                     if self.record_tokens else None)
        c = self.cfg
        per_tok = 2 * (c.attn_proj_params + c.ffn_params)
        self.dense_flops += (B * T * per_tok * c.num_hidden_layers
                             + c.attn_core_flops(1) * self._ctx_sum * c.num_hidden_layers)
        layer_bytes = (c.attn_proj_params + c.ffn_params) * self.weight_bytes_per_param
        self.dense_weight_bytes += layer_bytes * c.num_hidden_layers

    def layer(self, i: int, attn_rows: torch.Tensor | None, kv_rows: torch.Tensor | None,
              ffn_rows: torch.Tensor | None, attn_ctx: float | None) -> None:
        """Rows that ran each unit (None = all rows). ``attn_ctx``: keys attended summed over active queries."""
        c = self.cfg
        B, T = self._bt
        n = B * T
        na = n if attn_rows is None else attn_rows.numel()
        nk = n if kv_rows is None else kv_rows.numel()
        nf = n if ffn_rows is None else ffn_rows.numel()
        q_o = c.attn_proj_params - c.kv_proj_params
        self.flops += 2 * (na * q_o + nk * c.kv_proj_params + nf * c.ffn_params)
        self.flops += c.attn_core_flops(1) * (self._ctx_sum if attn_rows is None else float(attn_ctx or 0.0))
        wb = self.weight_bytes_per_param
        self.weight_bytes += wb * ((q_o if na else 0) + (c.kv_proj_params if (na or nk) else 0)
                                   + (c.ffn_params if nf else 0))
        if self._map is not None and not (attn_rows is None and ffn_rows is None):
            m = self._map[:, :, i].view(-1)
            m.zero_()
            if kv_rows is None:
                m |= KV
            elif kv_rows.numel():
                m[kv_rows.cpu()] |= KV
            for rows, bit in ((attn_rows, ATTN), (ffn_rows, FFN)):
                if rows is None:
                    m |= bit
                elif rows.numel():
                    m[rows.cpu()] |= bit

    def end_step(self) -> None:
        if self._map is not None:
            self.unit_maps.append(self._map)

    def add_overhead(self, flops: float) -> None:
        self.overhead_flops += flops

    @property
    def head_row_flops(self) -> float:
        """FLOPs of the LM head for one row."""
        return 2.0 * self.cfg.hidden_size * self.cfg.vocab_size

    @property
    def head_weight_bytes(self) -> float:
        """Bytes of the LM head's weights, read once per call however many rows it serves."""
        per = self.weight_bytes_per_param if self.head_bytes_per_param is None else self.head_bytes_per_param
        return self.cfg.hidden_size * self.cfg.vocab_size * per

    def add_head_check(self, rows: int) -> None:
        """A policy consulting the LM head itself (an exit check): its FLOPs, and the head's weights read once."""
        self.overhead_flops += rows * self.head_row_flops
        self.overhead_bytes += self.head_weight_bytes

    def add_head(self, rows: int, dense_rows: int | None = None) -> None:
        """Final logits for ``rows`` rows, where dense would have computed ``dense_rows`` (default: the same); rows
        whose logits a policy already had (an exit check's) are not recomputed, so they cost nothing here."""
        dense_rows = rows if dense_rows is None else dense_rows
        self.head_flops += rows * self.head_row_flops
        self.head_bytes += self.head_weight_bytes if rows else 0.0
        self.dense_head_flops += dense_rows * self.head_row_flops
        self.dense_head_bytes += self.head_weight_bytes if dense_rows else 0.0

    # ---- read by benches and the CLI -----------------------------------------------------------------------------
    @property
    def flops_fraction(self) -> float:
        return (self.flops + self.overhead_flops) / self.dense_flops if self.dense_flops else 1.0

    @property
    def weight_bytes_fraction(self) -> float:
        return self.weight_bytes / self.dense_weight_bytes if self.dense_weight_bytes else 1.0

    @property
    def total_flops_fraction(self) -> float:
        """Everything executed, LM head included, over the same for dense: the prefill speed prediction."""
        d = self.dense_flops + self.dense_head_flops
        return (self.flops + self.overhead_flops + self.head_flops) / d if d else 1.0

    @property
    def total_weight_bytes_fraction(self) -> float:
        """Weights read, LM head and a policy's own head checks included: the decode speed prediction (bandwidth
        bound). The dense side reads the head once per step."""
        d = self.dense_weight_bytes + self.dense_head_bytes
        return (self.weight_bytes + self.overhead_bytes + self.head_bytes) / d if d else 1.0

    def layers_used(self) -> list[torch.Tensor]:
        """Per step, (B, T) count of layers in which each token ran attention or its FFN."""
        return [((m & (ATTN | FFN)) > 0).sum(-1) for m in self.unit_maps]

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "flops_fraction": round(self.flops_fraction, 6),
            "weight_bytes_fraction": round(self.weight_bytes_fraction, 6),
            "total_flops_fraction": round(self.total_flops_fraction, 6),
            "total_weight_bytes_fraction": round(self.total_weight_bytes_fraction, 6),
            "executed_gflops": round((self.flops + self.overhead_flops) / 1e9, 6),
            "dense_gflops": round(self.dense_flops / 1e9, 6),
            "overhead_gflops": round(self.overhead_flops / 1e9, 6),
        }
