"""TOVA (Oren et al. 2024): keep the tokens the last token attends to most, averaged over all heads.

One query per layer (the prompt's last token), one ranking shared by the layer's KV heads, as the paper's
layer-wise variant does; the last token itself is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVPolicy, protect_last, window_attention
from .registry import register


@register
@dataclass
class TOVA(KVPolicy):
    name = "tova"

    def scores(self, engine, i, x_in, ctx):
        s = window_attention(engine, i, x_in, ctx, 1)
        return protect_last(s.mean(1, keepdim=True).expand_as(s), 1)
