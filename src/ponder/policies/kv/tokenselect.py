"""TokenSelect (Wu et al. 2025): each decode query reads only its top-scoring cached tokens, chosen per KV head by
a soft vote of the head's query group; nothing is evicted, so a token unread now can be read at the next step.

Per layer and one-token step: the query's dot products with every cached key, a softmax per query head, summed
over the KV head's group (the "head soft vote"), and the top ``budget`` of each row's real tokens are the keys and
values that layer's attention reads (``LayerPlan.keys``), plus the new token itself.

What it saves here, honestly: the selected attention reads a ``budget`` share of the values and softmaxes over it,
but the selection itself reads every key (as the paper's does before its selection cache), so on this CPU it is a
quality method: ``saves`` is empty and the bench reports no speed for it. Prefill and multi-token steps run dense;
the bench feeds continuations one token at a time through it (``decodes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.forward import PlannerBase
from ...engine.plan import LayerPlan
from ...errors import PonderError
from .base import KVPolicy
from .registry import register


@register
@dataclass
class TokenSelect(KVPolicy):
    name = "tokenselect"
    saves = ()
    kv_compatible = False  # a multi-token step runs dense, a one-token step selects: the two differ by design
    decodes = True  # it acts on one-token steps: feed tokens one at a time to use it
    fan_out = True  # the prefill is dense and the cache whole

    def __post_init__(self) -> None:
        if self.tokens:
            raise PonderError("tokenselect's budget is the fraction of cached tokens each query reads; it takes no "
                              "token budget")
        super().__post_init__()

    def planner(self, engine):
        return None if self.budget >= 1.0 else SelectPlanner(self, engine)


class SelectPlanner(PlannerBase):
    def __init__(self, policy: TokenSelect, engine):
        self.policy, self.engine = policy, engine

    def layer(self, i, x, ctx):
        if ctx.T != 1 or ctx.start == 0:
            return None
        e, cache, past = self.engine, ctx.cache, ctx.start
        B, Hk, hd = ctx.B, e.cfg.num_key_value_heads, e.cfg.head_dim
        valid = cache.layer_valid(i)[:, :past]
        real = valid.sum(1)
        want = torch.clamp(torch.ceil(real.float() * self.policy.budget - 1e-6).long(), min=1)
        n = int(want.max())
        if n >= past:
            return None
        q = e.queries(i, x, ctx.positions)  # (B, H, 1, hd)
        G = q.shape[1] // Hk
        s = torch.matmul(q.reshape(B, Hk, G, hd), cache.k[i][:, :, :past].transpose(-1, -2)) * hd ** -0.5
        s = s.float().masked_fill(~valid[:, None, None, :], float("-inf"))
        vote = s.softmax(-1).sum(2)  # (B, Hk, past): the group's soft vote
        vote = vote.masked_fill(~valid[:, None, :], -1.0)
        top = vote.topk(n, dim=-1)
        rank = torch.arange(n, device=x.device)[None, None, :]
        ok = (rank < want[:, None, None]) & (top.values >= 0)
        return LayerPlan(keys=top.indices, keys_ok=ok)
