"""StreamingLLM (Xiao et al. 2023): keep the first few tokens (attention sinks) and the most recent window.

No scores at all: the cheapest rule, and the baseline every scored method must beat. (The paper also slides the
window during decode; here, as kvpress does, the prompt is cut once and generated tokens are added.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVPolicy, protect_first
from .registry import register


@register
@dataclass
class Streaming(KVPolicy):
    sinks: int = 4

    name = "streaming"
    scores_from = "none"

    def min_tokens(self) -> int:
        return self.sinks + 1

    def needs(self) -> str:
        return f"{self.sinks} sinks and a window of at least one token"

    def scores(self, engine, i, x_in, ctx):
        B, Hk = x_in.shape[0], engine.cfg.num_key_value_heads
        recency = torch.arange(ctx.end, device=x_in.device, dtype=torch.float32).expand(B, Hk, ctx.end)
        return protect_first(recency, ctx, self.sinks)
