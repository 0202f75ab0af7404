"""SnapKV (Li et al. 2024): the last ``window`` prompt tokens observe the rest; keep what they attend to.

Per layer and KV head, the window's attention (averaged over its queries and the head's query group) is smoothed
by an average pool over neighbouring columns (``kernel``, as the authors' code does: a kept token brings its
neighbours, which keeps phrases whole), and the window itself is always kept. The window's queries are recomputed
from the layer's input: a ``window`` x T product per layer, small beside the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import KVPolicy, protect_last, window_attention
from .registry import register


@register
@dataclass
class SnapKV(KVPolicy):
    window: int = 32
    kernel: int = 5

    name = "snapkv"

    def min_tokens(self) -> int:
        return self.window + 1

    def needs(self) -> str:
        return f"its observation window of {self.window} tokens and one more"

    def scores(self, engine, i, x_in, ctx):
        s = window_attention(engine, i, x_in, ctx, self.window)
        if self.kernel > 1:
            B, Hk, T = s.shape
            s = F.avg_pool1d(s.view(B * Hk, 1, T), self.kernel, stride=1, padding=self.kernel // 2).view(B, Hk, T)
        return protect_last(s, self.window)
