"""Key norm (Devoto et al. 2024, kvpress's KnormPress): keep the keys with the smallest L2 norm, which their paper
finds correlate with high attention. No queries at all: a score from the cache alone, as cheap as StreamingLLM."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVPolicy
from .registry import register


@register
@dataclass
class KeyNorm(KVPolicy):
    name = "knorm"
    scores_from = "keys"

    def scores(self, engine, i, x_in, ctx):
        return -ctx.cache.k[i][:, :, :ctx.end].float().norm(dim=-1)
