"""SkipDecode: one depth per sequence position, shared by the batch, falling monotonically along the sequence.

After SkipDecode (Del Corro et al., 2023). The token at schedule index ``s`` skips the ``n(s)`` layers
``[keep_first, keep_first + n(s))``: lower-to-middle layers, so the top layers and the head always run. ``n(s)``
grows linearly from ``n0`` at the start of the span to ``n1`` at its end (never decreasing), and the pair is chosen
so the mean per-token layer fraction over the span meets the budget.

KV consistency, without recomputation. A token at index ``s`` runs layer ``i`` iff ``i < keep_first`` or
``i >= keep_first + n(s)``. In layer ``i`` it attends to every earlier token ``q`` (index ``s_q <= s``), and
``n(s_q) <= n(s)``, so ``q`` ran layer ``i`` too and left its K/V there. The slots a token leaves empty (its skipped
layers) are never read: every later token skips those layers as well. So skipped layers use ``kv="none"`` and cost
nothing, and cached decoding equals recomputation.

Schedule index. In generation the origin is each row's prompt length (the prompt runs the full model, as in the
paper), so decode step ``j`` has index ``j - 1`` in every row: the plan is one whole-layer skip for the whole batch
(real decode savings at any batch size), and a row gets the same plan alone as in a batch. The span is the
generation length (``max_new_tokens``) unless ``span`` is set. In scoring (perplexity) there is no prompt: the index
is the position in the window and the span is the window, so early positions run deep and late ones shallow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.forward import Engine, Planner, PlannerBase, StepContext
from ..engine.generate import GenerationResult, SamplingConfig, generate
from ..engine.plan import LayerPlan
from ..engine.stats import Stats
from ..errors import PonderError
from .base import Policy
from .registry import register


def schedule(L: int, keep_first: int, budget: float, span: int) -> torch.Tensor:
    """Skipped-layer counts ``n(s)`` for s in [0, span): non-decreasing, integer, mean layer fraction <= budget.

    The linear ramp keeps the first positions as deep as the budget allows (``n0`` as small as possible) and lowers
    the end depth first; only when even the shallowest end (one layer past ``keep_first``) is not enough does the
    start depth drop as well."""
    nmax = L - keep_first - 1  # at least one top layer runs
    s = torch.arange(span, dtype=torch.float64) / max(span - 1, 1)

    def counts(n0: float, n1: float) -> torch.Tensor:
        return torch.ceil(n0 + (n1 - n0) * s - 1e-9).clamp(0, nmax).long()

    def frac(n0: float, n1: float) -> float:
        return float(1.0 - counts(n0, n1).double().mean() / L)

    if budget >= 1.0:
        return torch.zeros(span, dtype=torch.long)
    if frac(nmax, nmax) > budget + 1e-12:
        raise PonderError(f"skipdecode cannot reach budget {budget:g} on this {L}-layer model: {keep_first} first "
                          f"layer(s) and the last layer always run, so its minimum reachable budget is "
                          f"{(keep_first + 1) / L:.3f}")
    # Smallest n1 with n0 = 0 ...
    if frac(0.0, nmax) <= budget:
        lo, hi = 0.0, float(nmax)  # frac(0, lo) > budget >= frac(0, hi)
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if frac(0.0, mid) <= budget else (mid, hi)
        return counts(0.0, hi)
    lo, hi = 0.0, float(nmax)  # ... else n1 = nmax and the smallest n0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if frac(mid, nmax) <= budget else (mid, hi)
    return counts(hi, nmax)


class SkipDecodePlanner(PlannerBase):
    def __init__(self, engine: Engine, budget: float, keep_first: int, span: int | None):
        self.L = engine.cfg.num_hidden_layers
        self.ctx_len = engine.cfg.max_position_embeddings
        self.budget, self.keep_first, self.span = budget, keep_first, span
        self.origin: torch.Tensor | None = None  # (B,) schedule origin per row
        self.table: torch.Tensor | None = None
        self.n: torch.Tensor | None = None  # (B, T) skipped-layer counts of the current step
        self.uniform: int | None = None  # the count when the whole step shares it

    def _counts(self, idx: torch.Tensor, span: int) -> torch.Tensor:
        if self.table is None or self.table.numel() != span:
            self.table = schedule(self.L, self.keep_first, self.budget, span).to(idx.device)
        return torch.where(idx < 0, torch.zeros_like(idx), self.table[idx.clamp(0, span - 1)])

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        if i == 0:
            pos = ctx.positions
            if ctx.phase == "prefill" and self.origin is None:
                self.origin = pos[:, -1] + 1  # the prompt runs the full model; generation starts after it
                self.n, self.uniform = None, 0
                return None
            origin = self.origin if self.origin is not None else torch.zeros_like(pos[:, 0])
            idx = pos - origin[:, None]
            if self.span is not None:
                span = self.span
            elif self.origin is None:  # scoring: the schedule spans the window
                span = ctx.T
            else:
                span = max(1, self.ctx_len - int(origin.min()))
            self.n = self._counts(idx, span)
            lo, hi = int(self.n.min()), int(self.n.max())
            self.uniform = lo if lo == hi else None
        kf = self.keep_first
        if self.uniform is not None:
            return LayerPlan.skip(x.device, kv="none") if kf <= i < kf + self.uniform else None
        run = ~((i >= kf) & (i < kf + self.n))
        return LayerPlan.from_masks(run, run, kv="none")


@register
@dataclass
class SkipDecode(Policy):
    """One depth per position shared by the batch, falling along the sequence; skips lower-middle layers."""

    name: ClassVar[str] = "skipdecode"
    meets_budget: ClassVar[bool] = True  # over the span (the generated tokens, or a scored window)
    keep_first: int = 1  # layers [0, keep_first) always run
    span: int | None = None  # schedule length; None: max_new_tokens in generation, the window in scoring

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_first < 0:
            raise PonderError("keep_first must be >= 0")

    def planner(self, engine: Engine) -> Planner | None:
        if self.budget >= 1.0:
            return None
        L = engine.cfg.num_hidden_layers
        if self.keep_first >= L:
            raise PonderError(f"keep_first={self.keep_first} leaves no layer to skip in a {L}-layer model")
        schedule(L, self.keep_first, self.budget, 2)  # refuses an unreachable budget up front
        return SkipDecodePlanner(engine, self.budget, self.keep_first, self.span)

    def generate(self, engine: Engine, prompts: list[list[int]], sc: SamplingConfig, stats: Stats | None = None,
                 on_token=None) -> GenerationResult:
        span = self.span if self.span is not None else max(1, sc.max_new_tokens - 1)  # decode steps feed N-1 tokens
        if self.budget >= 1.0:
            return generate(engine, prompts, sc, None, stats, on_token)
        self.planner(engine)
        return generate(engine, prompts, sc, lambda: SkipDecodePlanner(engine, self.budget, self.keep_first, span),
                        stats, on_token)

