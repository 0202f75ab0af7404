"""FFN skipping on saturation, after FFN-SkipLLM: attention always runs, so the KV cache stays complete.

Signal. Each token's residual stream "saturates" in the middle of the stack: a layer barely turns it. Before layer
``i`` the planner holds the token's state entering layer ``i - 1`` and entering layer ``i``; their cosine is the
saturation of layer ``i - 1``, free to compute (O(d) per token) and known before layer ``i`` runs, which is when the
decision must be made. Once a token's saturation reaches the threshold in the unprotected middle of the stack, it
skips the FFN of that layer and (greedily, as FFN-SkipLLM does) of every later unprotected layer; its attention
still runs everywhere. The first ``warmup`` positions of each sequence never skip (they anchor the attention sinks),
and the first ``protect_first`` / last ``protect_last`` layers ("cold" layers) always run their FFN.

Budget. Only FFN work can be saved, and only in unprotected layers after warm-up, so the minimum reachable budget is
``1 - ffn_share * unprotected / L`` (``min_budget``; about 0.4 for the shipped 12-layer model, whose attention is a
quarter of a layer's projection FLOPs); budgets below it are refused. The threshold is fitted by bisection on
calibration text so the realized fraction (cosine overhead included) meets the budget there.

Decisions use only the token's own states, so a padded batch equals its rows alone and cached decoding equals
recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.forward import Engine, PlannerBase, StepContext
from ..engine.plan import LayerPlan
from ..errors import PonderError
from .base import layer_flops_share
from .budget import ThresholdPolicy
from .registry import register


def saturation_sums(p: torch.Tensor, x: torch.Tensor, with_pp: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per row of states ``p`` and ``x`` (..., D): ``p.p`` (or None) and the stacked ``[p.x, x.x]`` (2, ...), as
    float32 sums. One definition whether a batch asks or one token does, so both decide alike."""
    pf, xf = p.float(), x.float()
    return ((pf * pf).sum(-1) if with_pp else None), (torch.stack((pf, xf)) * xf).sum(-1)


class FFNSkipPlanner(PlannerBase):
    """Why the arithmetic looks hand-rolled: at batch 1 the check runs once per layer per token and each torch call
    costs microseconds, as much as the FFN it might save in a small model. So the squared norm of a layer's input is
    kept for the next layer's check, and a single-token step decides in Python from two numbers. Both paths compute
    the same float32 reductions per row and the same float64 cosine, so a batch decides exactly as its rows alone."""

    def __init__(self, engine: Engine, threshold: float, warmup: int, first: int, last: int, sticky: bool):
        self.L = engine.cfg.num_hidden_layers
        self.D = engine.cfg.hidden_size
        self.thr = threshold
        self.warmup = warmup
        self.lo, self.hi = first, self.L - last  # unprotected layers: [lo, hi)
        self.sticky = sticky
        self.prev: torch.Tensor | None = None
        self.prev_sq: torch.Tensor | float | None = None  # squared norms of ``prev`` per row, when already known
        # (B, T) bool (None before a batch step's first check), or a Python bool for a one-token step
        self.skipping: torch.Tensor | bool | None = False
        self.eligible: torch.Tensor | bool = False  # past warm-up
        self.n_skipping = 0  # rows of the step skipping now (one host sync per decided layer)
        self._all: LayerPlan | None = None

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        N = ctx.B * ctx.T
        if i == 0:
            self.n_skipping, self.prev_sq = 0, None
            if N == 1:
                self.skipping, self.eligible = False, int(ctx.positions) >= self.warmup
            else:
                self.skipping, self.eligible = None, ctx.positions >= self.warmup
        elif i < self.hi and i >= max(self.lo, 1) and not (self.sticky and self.n_skipping == N):
            # (sticky and every row already skipping: nothing left to decide, so nothing is computed)
            hit = self._saturated(x, N)
            if ctx.stats is not None:
                ctx.stats.add_overhead(6.0 * self.D * N)
            if N == 1:
                self.skipping = (self.skipping or hit) if self.sticky else hit
                self.n_skipping = int(self.skipping)
            else:
                self.skipping = hit if (self.skipping is None or not self.sticky) else (self.skipping | hit)
                self.n_skipping = int(self.skipping.sum())
        else:
            self.prev_sq = None
        self.prev = x
        if not (self.lo <= i < self.hi) or self.n_skipping == 0:
            return None
        if self.n_skipping == N:  # the same plan for every such layer: attention for all, no FFN
            if self._all is None:
                self._all = LayerPlan(attn=None, ffn=torch.empty(0, dtype=torch.long, device=x.device))
            return self._all
        return LayerPlan.from_masks(None, ~self.skipping)

    def _saturated(self, x: torch.Tensor, N: int) -> torch.Tensor | bool:
        """cos(state entering the previous layer, state entering this one) >= threshold, past warm-up."""
        pp, px_xx = saturation_sums(self.prev, x, self.prev_sq is None)
        if N == 1:  # decide in Python from two floats
            if pp is not None:
                self.prev_sq = pp.item()
            px, xx = px_xx.view(2).tolist()
            cos = px / max(math.sqrt(self.prev_sq * xx), 1e-12)
            self.prev_sq = xx
            return cos >= self.thr and self.eligible
        if pp is not None:
            self.prev_sq = pp.double()
        px, xx = px_xx.double()  # [prev . x, x . x]
        cos = px / (self.prev_sq * xx).sqrt().clamp_min(1e-12)
        self.prev_sq = xx
        return (cos >= self.thr) & self.eligible


@register
@dataclass
class FFNSkip(ThresholdPolicy):
    """Skip a token's FFN in the middle layers once its residual stream saturates; attention always runs."""

    name: ClassVar[str] = "ffn-skip"
    cheap: ClassVar[float] = -1.0  # every token past warm-up skips from the first unprotected layer
    warmup: int = 4  # first positions of every sequence never skip
    protect_first: int = 1
    protect_last: int = 1
    sticky: bool = True  # once saturated, skip every later unprotected FFN (FFN-SkipLLM's greedy rule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protect_first < 1 or self.protect_last < 1:
            raise PonderError("ffn-skip protects at least the first and the last layer (protect_first/last >= 1)")

    def min_budget(self, engine: Engine) -> float:
        """Projection-FLOP fraction left when every unprotected FFN is skipped (a lower bound: the attention core,
        warm-up tokens and the cosine checks come on top, and the measured minimum is what calibration enforces)."""
        L = engine.cfg.num_hidden_layers
        _, ffn = layer_flops_share(engine)
        return 1.0 - ffn * max(0, L - self.protect_first - self.protect_last) / L

    def _precheck(self, engine: Engine) -> None:
        mb = self.min_budget(engine)
        if self.budget < mb:
            raise PonderError(f"ffn-skip cannot reach budget {self.budget:g} on this model: attention always runs and "
                              f"{self.protect_first}+{self.protect_last} layers are protected, so its minimum "
                              f"reachable budget is {mb:.3f}; use a larger --budget")

    def _planner(self, engine: Engine, threshold: float) -> FFNSkipPlanner:
        return FFNSkipPlanner(engine, threshold, self.warmup, self.protect_first, self.protect_last, self.sticky)
