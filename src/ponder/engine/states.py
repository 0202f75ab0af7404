"""Every layer's output from one dense pass: what a lens, a ranking of layers or a draft-acceptance estimate reads.

In the engine (not in ``eval``) because policies calibrate on it, and policies must not import evaluation code.
"""

from __future__ import annotations

import torch

from .forward import Engine, PlannerBase, StepContext


class _Tap(PlannerBase):
    """A planner that changes nothing and keeps each layer's output."""

    def __init__(self) -> None:
        self.outs: list[torch.Tensor] = []

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> None:
        return None

    def observe(self, i: int, x: torch.Tensor, ctx: StepContext) -> None:
        self.outs.append(x)


def layer_states(engine: Engine, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
    """Each layer's output (B, T, D) for token ids ``x`` (B, T) from one dense scoring pass (of the first ``last``
    layers only, when given)."""
    tap = _Tap()
    engine.forward(x, planner=tap, logits=None, phase="score", last_layer=last)
    return tap.outs
