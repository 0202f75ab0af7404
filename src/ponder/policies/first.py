"""FiRST-style per-sequence layer selection: the prompt chooses which layers a sequence runs, for all of its decode.

After "FiRST: Finetuning Router-Selective Transformers": a router reads the prompt and picks a layer subset per
sequence, kept for every generated token. Decisions per sequence instead of per token mean a decode step's plan is
fixed (no decision, no gather in a one-sequence step) and a skipped layer leaves no K/V anyone reads
(``kv="none"``), so nothing is projected for it.

Scores. ponder's trained skip router (``ponder train router``) gives each token and layer run-logits; a layer's
score for a sequence is the mean over its first step's first ``prefix`` tokens of the FLOPs-weighted logit
(attention's Q/O share times its logit plus the FFN's share times its, for an attention+FFN router), and the layer
runs when that score plus the offset is positive. Scored in order during the prompt's own pass: layer ``i`` reads the
prompt's states after the layers the sequence actually ran. The offset is fitted on calibration text to the budget.
What FiRST trains (a sequence-level router and LoRA on the kept layers) is not trained here: this is the decision
rule on a token router's scores, and its row says so.

Only the prompt decides (``prefix`` caps how much of a long first step is read: in scoring, the window's first
``prefix`` tokens, so the choice barely sees the tokens it is judged on). Per-row float64 sums over the row's own
non-padding tokens: a batch decides as its rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.forward import Engine, PlannerBase, StepContext
from ..engine.plan import LayerPlan
from ..models.adapters import Router
from .base import unit_shares
from .registry import register
from .router import SkipRouter


class FirstPlanner(PlannerBase):
    def __init__(self, engine: Engine, router: Router, offset: float, prefix: int):
        self.r, self.off, self.prefix, self.D = router, offset, prefix, engine.cfg.hidden_size
        qo, _, ffn = unit_shares(engine)
        self.wts = torch.tensor([qo, ffn], dtype=torch.float64, device=engine.device)
        self.keep: list[torch.Tensor | bool] = []  # per layer: (B,) bool, or True / False for every row
        self.plans: dict[tuple[int, int], LayerPlan | None] = {}  # (layer, step length) -> plan

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        if len(self.keep) <= i:
            if ctx.start != 0:
                raise RuntimeError("a FiRST planner decides on a sequence's first step")
            self.keep.append(self._decide(i, x, ctx))
        key = (i, ctx.T)
        if key not in self.plans:  # the rows' flat indices depend on the step's length
            k = self.keep[i]
            if k is True:
                self.plans[key] = None
            elif k is False:
                self.plans[key] = LayerPlan.skip(x.device, kv="none")
            else:
                m = k[:, None].expand(ctx.B, ctx.T)
                self.plans[key] = LayerPlan.from_masks(m, m, kv="none")
        return self.plans[key]

    def _decide(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor | bool:
        valid = ctx.cache.valid[:, ctx.start:ctx.end]
        # the first ``prefix`` real tokens of each row (left padding comes first)
        valid = valid & (valid.long().cumsum(1) <= self.prefix)
        z = self.r.logits(i, x).double()  # (B, T, U)
        s = z[..., 0] if z.shape[-1] == 1 else (z * self.wts).sum(-1) / self.wts.sum()
        score = (s * valid).sum(1) / valid.sum(1).clamp_min(1)
        if ctx.stats is not None:
            ctx.stats.add_overhead(self.r.flops_per_row() * int(valid.sum()))
        keep = (score + self.off) > 0
        return True if bool(keep.all()) else False if not bool(keep.any()) else keep


@register
@dataclass
class First(SkipRouter):
    """One layer subset per sequence, chosen from its prompt by the trained router's scores (FiRST's rule)."""

    name: ClassVar[str] = "first"
    prefix: int = 64  # tokens of the first step that decide

    def _planner(self, engine: Engine, threshold: float) -> FirstPlanner:
        return FirstPlanner(engine, self._router(engine), threshold, self.prefix)
