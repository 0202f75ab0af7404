"""Unified layer skipping: how many layers to skip follows from the budget alone, spread evenly through the middle.

After "Accelerating Inference in LLMs with a Unified Layer Skipping Strategy": the same layers are skipped for every
token, so a batch is one matrix and nothing ever needs a skipped layer's K/V (no token runs it). Skipping ``k`` of
``L`` layers leaves ``(L - k) / L`` of the per-token projection FLOPs; ``k`` is the smallest count that meets the
budget, so the realized fraction never exceeds it. The first and last layers are always kept (they do the most
distinctive work: the first turns embeddings into features, the last turns features into predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..engine.forward import Engine, Planner
from ..engine.plan import LayerPlan
from ..errors import PonderError
from .base import Policy, StaticPlanner
from .registry import register


def spread(candidates: list[int], k: int) -> list[int]:
    """``k`` of ``candidates`` (sorted), evenly spaced: the j-th pick sits at the middle of the j-th of k equal bins."""
    m = len(candidates)
    return [candidates[int((j + 0.5) * m / k)] for j in range(k)] if k else []


@register
@dataclass
class UnifiedSkip(Policy):
    """Skip the same evenly spread middle layers for every token; count from the budget alone."""

    name: ClassVar[str] = "unified-skip"
    meets_budget: ClassVar[bool] = True  # realized per-token layer FLOPs never exceed the budget

    def skipped(self, engine: Engine) -> list[int]:
        L = engine.cfg.num_hidden_layers
        k = math.ceil(L * (1.0 - self.budget) - 1e-9)
        if k > L - 2:
            raise PonderError(f"unified-skip cannot reach budget {self.budget:g} on this {L}-layer model: the first "
                              f"and last layers are kept, so its minimum reachable budget is {2 / L:.3f}")
        return spread(list(range(1, L - 1)), k)

    def planner(self, engine: Engine) -> Planner | None:
        skip = set(self.skipped(engine))
        if not skip:
            return None
        L = engine.cfg.num_hidden_layers
        return StaticPlanner([LayerPlan.skip(engine.device, kv="none") if i in skip else None for i in range(L)])
