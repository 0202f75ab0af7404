"""Static layer dropping: the same whole layers removed for every token.

The simplest real saving (a shallower model, no per-token decisions), and the baseline an adaptive policy has to
beat to justify its routing. Layers are ranked by how much the calibration loss rises when each one alone is
removed (one dense pass plus one pass per layer over a little calibration text, cached per engine), and the least
important ones are dropped until the executed fraction is at most the budget. A dropped layer leaves no K/V
(``kv="none"``): nothing reads it, since no token runs that layer.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..engine.forward import Engine
from ..engine.plan import LayerPlan
from .base import Policy, StaticPlanner
from .registry import register

CALIB_SEQS = 8  # 8 x 256 tokens: ranks a 12-layer model in a few seconds on 2 CPU cores

# engine -> {calibration key: per-layer loss increase}; one ranking serves every budget of a sweep
_SCORES: "weakref.WeakKeyDictionary[Engine, dict[tuple, list[float]]]" = weakref.WeakKeyDictionary()


def _mean_nll(engine: Engine, seqs: list[list[int]], planner) -> float:
    tot, n = 0.0, 0
    for t in seqs:
        ids = torch.tensor([t], device=engine.device)
        lg = engine.forward(ids, None, planner, None, logits="all").logits.float()
        lp = torch.log_softmax(lg[0, :-1], -1).gather(-1, ids[0, 1:, None])
        tot -= float(lp.sum())
        n += len(t) - 1
    return tot / max(n, 1)


def layer_importance(engine: Engine, texts: list[list[int]]) -> list[float]:
    """Calibration loss increase (nats/token) when each layer alone is removed; higher = more important."""
    seqs = [t for t in texts if len(t) >= 2][:CALIB_SEQS]
    L = engine.cfg.num_hidden_layers
    if not seqs:
        return [0.0] * L
    key = (len(seqs), hash(tuple(tuple(t) for t in seqs)))
    per = _SCORES.setdefault(engine, {})
    if key not in per:
        base = _mean_nll(engine, seqs, None)
        skip = LayerPlan.skip(engine.device, kv="none")
        scores = []
        for i in range(L):
            plans: list[LayerPlan | None] = [None] * L
            plans[i] = skip
            scores.append(_mean_nll(engine, seqs, StaticPlanner(plans)) - base)
        per[key] = scores
    return list(per[key])


@register
@dataclass
class LayerDrop(Policy):
    """Drops the least important whole layers for all tokens (ranked on calibration text)."""

    dropped: list[int] | None = field(default=None)  # set by calibrate; or give explicit layer indices

    name: ClassVar[str] = "layer-drop"
    real: ClassVar[bool] = True
    kv_compatible: ClassVar[bool] = True
    batch_compatible: ClassVar[bool] = True
    training_free: ClassVar[bool] = True

    def n_drop(self, n_layers: int) -> int:
        """Fewest layers whose removal brings the fraction of layer work to at most the budget."""
        return min(n_layers - 1, max(0, math.ceil((1.0 - self.budget) * n_layers - 1e-9)))

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        L = engine.cfg.num_hidden_layers
        k = self.n_drop(L)
        if k == 0:
            self.dropped = []
            return
        scores = layer_importance(engine, texts)
        if not any(scores):  # no calibration text (no tokenizer): drop from the middle outwards
            mid = (L - 1) / 2
            order = sorted(range(L), key=lambda i: (abs(i - mid), i))
        else:
            order = sorted(range(L), key=lambda i: (scores[i], i))
        self.dropped = sorted(order[:k])

    def planner(self, engine: Engine) -> StaticPlanner | None:
        if self.dropped is None:
            self.calibrate(engine, [])
        if not self.dropped:
            return None
        L = engine.cfg.num_hidden_layers
        skip = LayerPlan.skip(engine.device, kv="none")
        return StaticPlanner([skip if i in self.dropped else None for i in range(L)])
