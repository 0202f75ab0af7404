"""The oracle: each token exits at the fewest layers whose top-1 (final norm + shared head) equals the dense top-1.

An upper bound, not a method: deciding needs the dense model's answer for the very token being decided. At the
start of every step the planner runs the dense model on the same inputs (a private dense KV cache beside the real
one) and keeps its top-1 per token; then, from depth ``floor`` on, a running token leaves as soon as its current
state's top-1 equals that answer, or at depth ``cap`` whatever it says. Neither the dense reference pass nor the
per-layer head calls are counted: the oracle's FLOPs are the layers its tokens used, which is what a perfect router
with a free signal would spend (Duo-LLM's point is that trained routers do not get there). ``real`` is False, so no
speedup is ever reported for it.

Equal-budget rows. The unconstrained oracle (``floor=1``, ``cap=L``) spends some natural fraction ``f*``. For a
budget above ``f*`` the floor rises (tokens run at least ``floor`` layers, which only adds agreement); for a budget
below it the cap falls (the hardest tokens are cut off). Both are the largest integers whose fraction, measured on
calibration text, stays within the budget. Skipped layers' KV slots follow ``kv_fill`` as in early-exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.cache import KVCache
from ..engine.forward import Engine, Planner, StepContext
from ..errors import PonderError
from ..models.adapters import Translators
from .base import Calibrated, exit_lens
from .budget import default_calibration, measure
from .early_exit import ExitPlanner, check_kv_fill
from .registry import register


class OraclePlanner(ExitPlanner):
    def __init__(self, engine: Engine, kv_fill: str, floor: int, cap: int, lens: Translators | None = None):
        super().__init__(engine, kv_fill)
        self.lens = lens
        self.L = engine.cfg.num_hidden_layers
        self.floor, self.cap = floor, cap
        self.ref_cache: KVCache | None = None
        self.ref: torch.Tensor | None = None

    def begin(self, x: torch.Tensor, ctx: StepContext) -> None:
        """The dense model's top-1 for this step's tokens, from the same inputs and a private dense cache."""
        if self.ref_cache is None or self.ref_cache.length != ctx.start:
            if ctx.start != 0:
                raise RuntimeError("an oracle planner serves one sequence of steps from its start")
            self.ref_cache = self.engine.new_cache(ctx.B, ctx.cache.max_len)
            if ctx.cache.padded:
                self.ref_cache.set_padding(ctx.cache.pad)
        self.ref_cache.reserve(ctx.T)
        shape = torch.zeros(ctx.B, ctx.T, dtype=torch.long, device=x.device)
        out = self.engine.forward(shape, self.ref_cache, logits="all", phase=ctx.phase, hidden=x)
        self.ref = out.logits.argmax(-1).reshape(-1)

    def checks_at(self, i: int) -> bool:
        return self.floor <= i < self.L

    def leave(self, i: int, h: torch.Tensor, rows: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.lens is not None:
            # through the translators: the check's logits are the exited tokens' outputs (their frozen state would
            # decode through the plain head at the end of the step otherwise)
            self.check_logits = self.engine.logits(self.lens(i, h))
            if i >= self.cap:
                return torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
            return self.check_logits.argmax(-1) == self.ref[rows]
        if i >= self.cap:
            return torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        return self.engine.logits(h).argmax(-1) == self.ref[rows]


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi) with ok(n), given ok(lo) and not ok(hi) and monotonicity."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@register
@dataclass
class Oracle(Calibrated):
    """Upper bound: exit at the first layer whose top-1 equals dense (needs the dense answer; not real)."""

    name: ClassVar[str] = "oracle"
    real: ClassVar[bool] = False
    kv_fill: str = "state"
    floor: int | None = None  # None (with cap None): both fitted to the budget by calibrate
    cap: int | None = None
    lens: str = "auto"  # as early-exit's: "auto" (shipped exit translators when present), "plain", or a path

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kv_fill(self.kv_fill)

    def _planner(self, engine: Engine, floor: int, cap: int) -> OraclePlanner:
        L = engine.cfg.num_hidden_layers
        if not (1 <= floor <= L and 1 <= cap <= L):
            raise PonderError(f"oracle floor and cap must be in [1, {L}]")
        return OraclePlanner(engine, self.kv_fill, floor, cap, exit_lens(engine, self.lens))

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        if self.budget >= 1.0 or self.floor is not None or self.cap is not None:
            return
        L = engine.cfg.num_hidden_layers
        seen: dict[tuple[int, int], float] = {}  # each (floor, cap) is a pass over the calibration text: once

        def frac(f: int, c: int) -> float:
            if (f, c) not in seen:
                seen[f, c] = measure(engine, lambda: self._planner(engine, f, c), texts, per_sample=False).fraction
            return seen[f, c]

        natural = frac(1, L)
        if natural <= self.budget:
            floor, cap = _largest(lambda f: frac(f, L) <= self.budget, 1, L), L
        else:
            low = frac(1, 1)
            if low > self.budget:
                raise PonderError(f"oracle cannot reach budget {self.budget:g}: every token runs at least one layer, "
                                  f"so its minimum reachable budget is {low:.3f}; use a larger --budget")
            floor, cap = 1, _largest(lambda c: frac(1, c) <= self.budget, 1, L)
        self.fitted(engine, {"floor": floor, "cap": cap, "natural_fraction": natural,
                             "calibration_fraction": frac(floor, cap)})

    def planner(self, engine: Engine) -> Planner | None:
        L = engine.cfg.num_hidden_layers
        if self.floor is not None or self.cap is not None:
            return self._planner(engine, self.floor or 1, self.cap or L)
        if self.budget >= 1.0:
            return None
        if not self.fitted_for(engine):
            self.calibrate(engine, default_calibration(engine))
        return self._planner(engine, self.calibration["floor"], self.calibration["cap"])
