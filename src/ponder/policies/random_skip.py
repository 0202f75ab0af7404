"""Random layer skipping at equal budget: the sanity floor every adaptive policy must beat.

Each token skips whole middle layers at random (the first and last layer always run). The draw is a pure function of
(token position, layer, seed), not a stateful generator, so the same token skips the same layers whether it is
decoded with the KV cache, recomputed with the whole sequence, or run in a batch: the policy is therefore honestly
``kv_compatible`` and ``batch_compatible``. Skipped rows still project their K/V (``kv="compute"``) so later tokens
see a complete cache; that projection is counted, and calibration measures what it costs so the *executed* FLOP
fraction lands on the budget rather than the naive layer count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.forward import Engine, PlannerBase, StepContext
from ..engine.plan import LayerPlan
from ..engine.stats import Stats
from .base import Policy
from .registry import register

_M32 = 0xFFFFFFFF
_P, _L, _S, _C = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F  # the hash's constants, shared by both forms
_ROUNDS = (0x7FEB352D, 0x846CA68B)


def uniform_hash(positions: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """Deterministic uniforms in [0, 1) for each position (a 32-bit integer hash: splitmix-style mixing)."""
    h = (positions.to(torch.int64) * _P + layer * _L + seed * _S + _C) & _M32
    for mul in _ROUNDS:
        h = ((h ^ (h >> 16)) * mul) & _M32
    h = h ^ (h >> 16)
    return h.to(torch.float64) / 2.0 ** 32


def uniform_hash_int(position: int, layer: int, seed: int) -> float:
    """:func:`uniform_hash` for one position in plain integers: the same bits, without a dozen tensor operations
    per layer for a decode step's handful of tokens."""
    h = (position * _P + layer * _L + seed * _S + _C) & _M32
    for mul in _ROUNDS:
        h = ((h ^ (h >> 16)) * mul) & _M32
    return (h ^ (h >> 16)) / 2.0 ** 32


SMALL_STEP = 64  # up to this many tokens per step, draws are made in Python (decode); larger steps use tensors


class RandomSkipPlanner(PlannerBase):
    def __init__(self, p: float, seed: int, n_layers: int):
        self.p, self.seed, self.L = p, seed, n_layers
        self._pos: list[int] | None = None
        self._none: LayerPlan | None = None  # every row skips, K/V computed: one plan object, built once

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        if i == 0:
            n = ctx.B * ctx.T
            self._pos = ctx.positions.reshape(-1).tolist() if n <= SMALL_STEP else None
        if i == 0 or i == self.L - 1 or self.p <= 0:
            return None
        if self._pos is not None:
            rows = [j for j, q in enumerate(self._pos) if uniform_hash_int(q, i, self.seed) >= self.p]
            if len(rows) == len(self._pos):
                return None
            if not rows:  # at batch 1 the usual case; a fresh tensor and plan per layer cost more than the K/V
                if self._none is None:
                    self._none = LayerPlan.skip(x.device, kv="compute")
                return self._none
            r = torch.tensor(rows, dtype=torch.long, device=x.device)
            return LayerPlan(attn=r, ffn=r, kv="compute")
        run = uniform_hash(ctx.positions, i, self.seed) >= self.p  # (B, T) True = this token runs layer i
        return LayerPlan.from_masks(run, run, kv="compute")


@register
@dataclass
class RandomSkip(Policy):
    """Each token skips middle layers at random at equal budget (sanity floor); K/V still computed."""

    seed: int = 0

    name: ClassVar[str] = "random"
    real: ClassVar[bool] = True
    kv_compatible: ClassVar[bool] = True  # decisions depend on (position, layer, seed) only
    batch_compatible: ClassVar[bool] = True
    training_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._saving_at_p1: float | None = None  # measured fraction saved when every middle layer is skipped

    def skip_probability(self, engine: Engine) -> float:
        """Per (token, middle layer) skip probability whose expected executed fraction equals the budget.

        The executed fraction is linear in p, f(p) = 1 - p * s where s is the saving at p = 1; s is measured on
        calibration text when available, else estimated from the projection parameter counts (ignoring the
        attention core, so slightly conservative). Budgets below the floor (first and last layers plus the K/V
        projections) cannot be reached: p is capped at 1 and the realised fraction shows it.
        """
        c = engine.cfg
        L = c.num_hidden_layers
        if L <= 2 or self.budget >= 1.0:
            return 0.0
        s = self._saving_at_p1
        if s is None:
            per_layer = c.attn_proj_params + c.ffn_params
            s = (L - 2) / L * (1.0 - c.kv_proj_params / per_layer)
        return min(1.0, max(0.0, (1.0 - self.budget) / s)) if s > 0 else 0.0

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        L = engine.cfg.num_hidden_layers
        seqs = [t for t in texts if len(t) >= 2][:4]
        if L <= 2 or not seqs:
            return
        stats = Stats(engine.cfg, record_tokens=False)
        planner_all = RandomSkipPlanner(1.0, self.seed, L)
        for t in seqs:
            engine.forward(torch.tensor([t], device=engine.device), None, planner_all, stats, logits=None)
        self._saving_at_p1 = 1.0 - stats.flops_fraction

    def planner(self, engine: Engine) -> RandomSkipPlanner | None:
        p = self.skip_probability(engine)
        return RandomSkipPlanner(p, self.seed, engine.cfg.num_hidden_layers) if p > 0 else None
