"""MiKV (Yang et al. 2024, "No token left behind"): the tokens an eviction policy would drop stay, at low precision.

Why: an evicted token is gone for every later query, and the facts a long prompt carries are exactly the tokens a
question asked later needs (retrieval after an eviction collapses on this model: see bench-long). Kept at 4 bits
per value with a float16 scale and zero per 32 values, a token costs 15.6% of its float32 K/V, so at half the
memory about 40% of the prompt keeps full precision and every other token is still there to be read.

The budget is the fraction of the prompt's KV **bytes** kept (the memory a user budgets), so ``mikv@0.5`` and
``snapkv@0.5`` hold the same memory; the share kept at full precision follows from the bits, the group and the
model's dtype (``full_fraction``). ``tokens=N`` instead keeps N tokens at full precision and the rest low. Which
tokens keep full precision is ranked by another policy's scores (``by``): SnapKV's by default, a 32-query window
at prefill, where the paper uses H2O's accumulated attention (``by=h2o``: every prompt query's attention, 8x the
prefill time at 8k here). Measured on SmolLM2 at half the bytes, 3 windows of 1,536 tokens: +0.09% (snapkv) vs
+0.06% (h2o) on code, +0.11% vs +0.07% on prose; SnapKV alone at the same bytes +1.06% and +2.06%.

What it saves: memory only. A decode step reads the demoted slots packed (``engine/packed.cpp``) beside the kept
ones, through the Python attention route rather than the fused decode step: 0.92-0.95x dense at 4k-8k here, so
``saves`` does not list decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...engine.forward import Engine, StepContext
from ...engine.lowbits import BITS, bytes_per_value
from ...errors import PonderError
from .base import KVPlanner, KVPolicy, select
from .h2o import H2O
from .registry import register
from .snapkv import SnapKV
from .tova import TOVA

RANKERS: dict[str, type[KVPolicy]] = {"h2o": H2O, "snapkv": SnapKV, "tova": TOVA}


@register
@dataclass
class MiKV(KVPolicy):
    bits: int = 4
    group: int = 32  # values per scale and zero (the whole head where a head is smaller)
    by: str = "snapkv"

    name = "mikv"
    saves: ClassVar[tuple[str, ...]] = ("memory",)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise PonderError(f"mikv stores demoted tokens at one of {BITS} bits, got {self.bits}")
        if not isinstance(self.group, int) or self.group < 8 // self.bits or self.group % (8 // self.bits):
            raise PonderError(f"mikv's group must be a whole number of bytes of values at {self.bits} bits, got "
                              f"{self.group}")
        if self.by not in RANKERS:
            raise PonderError(f"mikv ranks tokens by one of {', '.join(RANKERS)}, got {self.by!r}")
        super().__post_init__()

    def full_fraction(self, elem_bytes: int, group: int) -> float:
        """The share of a prompt kept at full precision so that its KV bytes are ``budget`` of dense's."""
        low = bytes_per_value(self.bits, group) / elem_bytes
        if self.budget < low:
            raise PonderError(f"mikv at {self.bits} bits keeps every token at {100 * low:.1f}% of its "
                              f"{elem_bytes}-byte K/V at least; a budget of {self.budget:g} is below that: raise "
                              "the budget or lower bits")
        return (self.budget - low) / (1 - low)

    def planner(self, engine: Engine) -> KVPlanner | None:
        if self.budget >= 1.0 and not self.tokens:
            return None
        group = self.group_for(engine.cfg.head_dim)
        f = 1.0 if self.tokens else self.full_fraction(engine.dtype.itemsize, group)
        ranker = RANKERS[self.by](budget=max(f, 1e-6), tokens=self.tokens)
        return MixedPlanner(self, engine, ranker, group)

    def group_for(self, head_dim: int) -> int:
        """Values per scale on a model: ``group``, or the whole head where the head is smaller."""
        g = min(self.group, head_dim)
        if head_dim % g:
            raise PonderError(f"mikv's group of {self.group} must divide the model's head size {head_dim}")
        return g


class MixedPlanner(KVPlanner):
    """The ranker's cut, with every real token it would evict demoted instead."""

    def __init__(self, policy: MiKV, engine: Engine, ranker: KVPolicy, group: int):
        super().__init__(policy, engine)
        self.ranker, self.bits, self.group = ranker, policy.bits, group

    def kept(self, n: int) -> int:
        return self.ranker.kept(n)

    def scores(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.ranker.scores(self.engine, i, x_in, ctx)

    def cut(self, s: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, n: int, real: torch.Tensor) -> tuple:
        idx = select(s, valid, keep, n)
        B, Hk, _ = idx.shape
        kept = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        is_real = torch.arange(n, device=s.device)[None, :] >= (n - keep)[:, None]  # fillers come first
        kept.scatter_(2, idx, is_real[:, None, :].expand(B, Hk, n))
        rest = real - keep
        # every valid column not kept, in column order (equal scores: the stable sort keeps columns in order)
        order = torch.where(kept, float("-inf"), 0.0)
        low = select(order, valid, rest, int(rest.max()))
        return idx, keep, (low, rest, self.bits, self.group)
