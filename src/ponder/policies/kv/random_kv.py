"""Random eviction: the control every KV policy's quality must beat (seeded, so a run repeats exactly). Each row
draws from its own generator, so a row keeps the same slots in a batch as alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVPolicy
from .registry import register


@register
@dataclass
class RandomKV(KVPolicy):
    seed: int = 0

    name = "kv-random"
    scores_from = "none"

    def scores(self, engine, i, x_in, ctx):
        B, Hk, T = x_in.shape[0], engine.cfg.num_key_value_heads, ctx.end
        pad = ctx.cache.pad.tolist()
        out = torch.empty(B, Hk, T)
        for b in range(B):  # a row's draws depend on its own real tokens only (not the batch's padding)
            g = torch.Generator().manual_seed(self.seed * 1000003 + i)
            out[b, :, pad[b]:] = torch.rand(Hk, T - pad[b], generator=g)
            out[b, :, :pad[b]] = 0
        return out.to(x_in.device)
