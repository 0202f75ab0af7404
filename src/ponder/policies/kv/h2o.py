"""H2O (Zhang et al. 2023): heavy hitters, the tokens with the largest attention accumulated over every query of
the prompt, plus a recent window (``recent``: its share of the budget; the paper splits half and half).

Its scores need every prompt query's attention, which a fused attention kernel never materialises: they are
recomputed per layer, 256 queries at a time. That roughly doubles the prefill's attention work; it is H2O's cost,
not hidden here (``saves`` lists decode and memory only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PonderError
from .base import KVPolicy, protect_last, window_attention
from .registry import register


@register
@dataclass
class H2O(KVPolicy):
    recent: float = 0.5

    name = "h2o"

    def __post_init__(self) -> None:
        if not 0 <= self.recent < 1:
            raise PonderError(f"h2o recent share must be in [0, 1), got {self.recent}")
        super().__post_init__()

    def scores(self, engine, i, x_in, ctx):
        s = window_attention(engine, i, x_in, ctx, ctx.end)
        real = (ctx.end - ctx.cache.pad).tolist()
        recent = torch.tensor([int(self.recent * self.kept(r)) for r in real], device=s.device)
        return protect_last(s, recent)
