"""LazyLLM (Fu et al. 2024): prefill computes fewer and fewer prompt tokens in later layers; the last token (the
one whose next-token prediction is the time to first token) always runs.

At ``stages`` layers spread over the stack (after the first quarter), the tokens still running are ranked by the
attention the prompt's last token paid them at the layer before (mean over heads), and the top ones go on; the
fraction still running after the last stage is ``budget`` (stage j keeps ``budget ** (j / stages)``). Attention
sinks are always kept.

What a pruned token leaves behind (``kv``): by default nothing in the layers it no longer runs (``"none"``, the
paper's: those slots are masked for every later query, in a plain cache), or K/V projected from its frozen state
(``"compute"``). Measured on SmolLM2 (3 code windows of 1,536 tokens, budget 0.5): +0.75% continuation perplexity
with "none", +17.9% with "compute": K/V from a state frozen ten layers early mislead later queries more than a
missing token does. The paper's on-demand revival (recomputing a pruned token once a later step needs it, from
its saved state) is not implemented: a pruned token is never recomputed. Saves prefill time (the time to first
token); decode reads a cache of the same size, with holes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine.forward import PlannerBase
from ...engine.plan import LayerPlan
from ...errors import PonderError
from .base import KVPolicy, window_attention
from .registry import register

SINKS = 4


@register
@dataclass
class LazyLLM(KVPolicy):
    stages: int = 3
    first: float = 0.25  # the first pruning layer, as a fraction of the depth
    kv: str = "none"  # what a pruned token leaves in later layers: "none" (the paper's: nothing) or "compute"

    name = "lazyllm"
    saves = ("prefill",)
    fan_out = False  # it changes the prefill's own states: it needs its own pass

    def __post_init__(self) -> None:
        if self.tokens:
            raise PonderError("lazyllm's budget is the fraction of prompt tokens still computed in the last "
                              "layers; it takes no token budget")
        if self.kv not in ("none", "compute"):
            raise PonderError(f"lazyllm kv must be 'none' or 'compute', got {self.kv!r}")
        if self.stages < 1 or not 0 < self.first < 1:
            raise PonderError(f"lazyllm needs stages >= 1 and first in (0, 1), got {self.stages}, {self.first}")
        super().__post_init__()

    def planner(self, engine):
        if self.budget >= 1.0:
            return None
        return LazyPlanner(self, engine)

    def stage_layers(self, L: int) -> list[int]:
        a = max(1, round(self.first * L))
        return sorted({min(L - 1, a + round(j * (L - a) / self.stages)) for j in range(self.stages)})


class LazyPlanner(PlannerBase):
    """Prefill plans: the running rows shrink at each stage layer; decode steps run dense."""

    def __init__(self, policy: LazyLLM, engine):
        self.policy, self.engine = policy, engine
        self.stage = {l: j + 1 for j, l in enumerate(policy.stage_layers(engine.cfg.num_hidden_layers))}
        self.active: torch.Tensor | None = None  # flat rows still running
        self.plan: LayerPlan | None = None
        self.prev_x: torch.Tensor | None = None

    def layer(self, i, x, ctx):
        if ctx.phase != "prefill" or ctx.start != 0 or ctx.T < 2:
            return None
        if i == 0:
            self.active, self.plan = None, None
        if i in self.stage:
            self._prune(i, ctx)
        self.prev_x = x
        return self.plan

    def _prune(self, i: int, ctx) -> None:
        """Rank the running rows by the last token's attention at layer i - 1 and keep the top of each row."""
        B, T = ctx.B, ctx.T
        frac = self.policy.budget ** (self.stage[i] / self.policy.stages)
        s = window_attention(self.engine, i - 1, self.prev_x, ctx, 1).mean(1)  # (B, T): over every head
        col = torch.arange(T, device=s.device)
        rel = col[None, :] - ctx.cache.pad[:, None]
        s = s.masked_fill((rel >= 0) & (rel < SINKS), 2.0)  # sinks first
        s[:, T - 1] = 3.0  # the last token always runs
        s = s.masked_fill(rel < 0, -1.0)  # padding never does
        run = torch.zeros(B, T, dtype=torch.bool, device=s.device)
        if self.active is not None:
            run.view(-1)[self.active] = True
            s = s.masked_fill(~run, -1.0)
        real = (T - ctx.cache.pad).tolist()
        keep = torch.zeros(B, T, dtype=torch.bool, device=s.device)
        order = s.sort(dim=-1, descending=True, stable=True).indices
        for b in range(B):
            k = min(real[b], max(1, math.ceil(frac * real[b] - 1e-9)))
            keep[b, order[b, :k]] = True
        if self.active is not None:
            keep &= run
        self.active = keep.view(-1).nonzero().squeeze(1)
        self.plan = LayerPlan(attn=self.active, ffn=self.active, kv=self.policy.kv)  # type: ignore[arg-type]
