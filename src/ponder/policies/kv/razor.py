"""RazorAttention (Tang et al. 2024): a few heads retrieve from the whole context; the rest only need sinks and a
recent window. Keep every token for those heads, cut the others to a window.

Which heads retrieve is found once per model by calibration, not by the prompt: a random token sequence repeated
twice, and per query head the attention a token of the second copy pays to its earlier occurrence (an echo head)
and to the token after it (an induction head). A KV head is as retrieving as the best query head of its group;
the top ``heads`` share of all KV heads keep the whole prompt. On SmolLM2 the scores separate sharply (0.92, 0.81,
0.73, 0.63, ... 0.15 for the top 15, then below 0.13 down to 0.001), and those heads sit in layers 2-24.

The budget is the fraction of the prompt's K/V bytes held, as for every KV policy: with a share h of heads whole,
every head keeps ``budget - h`` of the tokens (sinks, then the most recent) in the layer's cut storage, the wide
heads their whole prompt beside it. (The wide heads' own window slots are never read, and counted: measured on
SmolLM2, budget 0.5 held 59% of dense's bytes when the window was ``(budget - h) / (1 - h)``.) A budget of h or
less cannot be met. What is not built: the paper's compensation token (the mean of the dropped K/V standing in
for them).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ...engine.forward import Engine, PlannerBase, StepContext
from ...errors import PonderError
from .base import KVPlanner
from .registry import register
from .streaming import Streaming

_CALIBRATED: weakref.WeakKeyDictionary[Engine, torch.Tensor] = weakref.WeakKeyDictionary()


class _Inputs(PlannerBase):
    def __init__(self) -> None:
        self.x: dict[int, torch.Tensor] = {}

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> None:
        self.x[i] = x
        return None


def retrieval_scores(engine: Engine, period: int = 128, seed: int = 0) -> torch.Tensor:
    """(layers, KV heads): each KV head's best query head's mean echo + induction attention on a random sequence
    repeated twice (``period`` tokens each, fewer where the model's window is shorter). Computed once per engine."""
    got = _CALIBRATED.get(engine)
    if got is not None:
        return got
    cfg = engine.cfg
    P = min(period, cfg.max_position_embeddings // 2)
    lo = min(1000, cfg.vocab_size // 4)  # past the special and byte tokens of a real vocabulary
    r = torch.randint(lo, cfg.vocab_size, (P,), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([r, r])[None].to(engine.device)
    T, H, Hk, hd = 2 * P, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    spy, cache = _Inputs(), engine.new_cache(1, T)
    engine.forward(ids, cache, spy, logits=None)
    pos = cache.positions(0, T)
    t = torch.arange(P, T, device=engine.device)
    future = torch.ones(T, T, dtype=torch.bool, device=engine.device).triu(1)
    out = torch.zeros(cfg.num_hidden_layers, Hk)
    for i in range(cfg.num_hidden_layers):
        q = engine.queries(i, spy.x[i], pos)[0].float()  # (H, T, hd)
        k = cache.k[i][0, :, :T].float().repeat_interleave(H // Hk, 0)
        p = (q @ k.transpose(-1, -2) * hd ** -0.5).masked_fill(future, float("-inf")).softmax(-1)
        s = p[:, t, t - P].mean(-1) + p[:, t[:-1], t[:-1] - P + 1].mean(-1)  # echo + induction
        out[i] = s.view(Hk, H // Hk).amax(-1).cpu()
    _CALIBRATED[engine] = out
    return out


@register
@dataclass
class Razor(Streaming):
    heads: float = 0.15

    name = "razor"
    scores_from = "calibration"

    def __post_init__(self) -> None:
        if not 0 < self.heads < 1:
            raise PonderError(f"razor's heads is the share of KV heads kept whole, in (0, 1), got {self.heads}")
        super().__post_init__()

    def wide_heads(self, engine: Engine) -> list[torch.Tensor]:
        """Per layer, the KV heads that keep every token: the top ``heads`` share by ``retrieval_scores``."""
        s = retrieval_scores(engine)
        n = max(1, round(self.heads * s.numel()))
        top = set(s.flatten().topk(n).indices.tolist())
        Hk = s.shape[1]
        return [torch.tensor([h for h in range(Hk) if i * Hk + h in top], dtype=torch.long, device=engine.device)
                for i in range(s.shape[0])]

    def planner(self, engine: Engine) -> KVPlanner | None:
        if self.budget >= 1.0 and not self.tokens:
            return None
        wide = self.wide_heads(engine)
        share = sum(w.numel() for w in wide) / (len(wide) * engine.cfg.num_key_value_heads)
        if not self.tokens and self.budget <= share:
            raise PonderError(f"razor keeps {100 * share:.1f}% of the KV heads whole, so it cannot keep only "
                              f"{self.budget:g} of the KV; raise the budget or lower heads")
        return RazorPlanner(self, engine, wide, share)


class RazorPlanner(KVPlanner):
    """Streaming's cut for every head of a layer, with the layer's wide heads kept whole beside it."""

    def __init__(self, policy: Razor, engine: Engine, wide: list[torch.Tensor], share: float):
        super().__init__(policy, engine)
        G = engine.cfg.num_attention_heads // engine.cfg.num_key_value_heads
        self.wide = [(h, (h[:, None] * G + torch.arange(G, device=h.device)).flatten()) for h in wide]
        self.window = 1.0 if policy.tokens else policy.budget - share  # every head's window, the wide ones' too

    def kept(self, n: int) -> int:
        """Tokens every head other than the wide ones keeps."""
        p = self.policy
        if p.tokens:
            return min(n, p.tokens)
        return min(n, max(p.min_tokens(), math.ceil(self.window * n - 1e-9)))

    def evict(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> tuple | None:
        out = super().evict(i, x_in, ctx)
        if out is None or not self.wide[i][0].numel():
            return out
        return (*out, None, self.wide[i])
