"""Static layer dropping: the same whole layers removed for every token.

The simplest real saving (a shallower model, no per-token decisions), and the baseline an adaptive policy has to
beat to justify its routing. Layers are ranked by how much the calibration loss rises when each one alone is
removed (one dense pass plus one pass per layer over a little calibration text, cached per engine), and the least
important ones are dropped until the executed fraction is at most the budget. A dropped layer leaves no K/V
(``kv="none"``): nothing reads it, since no token runs that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..engine.forward import Engine
from ..engine.plan import LayerPlan
from ..engine.states import layer_states
from ..errors import PonderError
from ..models.adapters import LayerReplacement, load_replacements, shipped_adapter
from .base import Policy, StaticPlanner, per_engine, text_key
from .registry import register

CALIB_SEQS = 8  # 8 x 256 tokens: ranks a 12-layer model in a few seconds on 2 CPU cores



def _nll_sum(engine: Engine, ids: torch.Tensor, logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None])
    return -float(lp.sum())


def layer_importance(engine: Engine, texts: list[list[int]]) -> list[float]:
    """Calibration loss increase (nats/token) when each layer alone is removed; higher = more important.

    Removing layer i leaves layers 0..i-1 as they were, so each removal resumes from layer i's saved input and runs
    only layers i+1.. and the head (the same computation as running the whole stack with layer i skipped, at about
    half the layer work: on a 30-layer model the ranking's 31 passes are its whole cost)."""
    seqs = [t for t in texts if len(t) >= 2][:CALIB_SEQS]
    L = engine.cfg.num_hidden_layers
    if not seqs:
        return [0.0] * L

    def rank() -> list[float]:
        base, drop, n = 0.0, [0.0] * L, 0
        by_len: dict[int, list[list[int]]] = {}
        for t in seqs:
            by_len.setdefault(len(t), []).append(t)
        with torch.inference_mode():
            for group in by_len.values():
                for g in range(0, len(group), 4):
                    ids = torch.tensor(group[g:g + 4], device=engine.device)
                    B, T = ids.shape
                    outs = layer_states(engine, ids)
                    ins = [engine.embedding(ids)] + outs[:-1]  # layer i's input
                    base += _nll_sum(engine, ids, engine.logits(outs[-1]))
                    for i in range(L):
                        if i == L - 1:  # the last layer removed: its input goes straight to the head
                            lg = engine.logits(ins[i])
                        else:
                            cache = engine.new_cache(B, T)
                            cache.reserve(T)
                            lg = engine.forward(ids, cache, None, None, logits="all", first_layer=i + 1,
                                                hidden=ins[i]).logits
                        drop[i] += _nll_sum(engine, ids, lg)
                    n += B * (T - 1)
        return [(d - base) / n for d in drop]

    return list(per_engine(engine, ("layer-drop", text_key(seqs)), rank))


@register
@dataclass
class LayerDrop(Policy):
    """Drops the least important whole layers for all tokens (ranked on calibration text)."""

    dropped: list[int] | None = field(default=None)  # set by calibrate; or give explicit layer indices
    # "none": the plain drop; "auto": the healed drop shipped for this model and budget when there is one
    # (adapters/<model>/layer-heal-<budget>), else plain; or a layer-heal adapter's path (`ponder train layer-heal`)
    heal: str = "none"
    replacements: dict[int, LayerReplacement] = field(default_factory=dict, repr=False, compare=False)
    heal_card: dict = field(default_factory=dict, repr=False, compare=False)

    name: ClassVar[str] = "layer-drop"
    real: ClassVar[bool] = True
    kv_compatible: ClassVar[bool] = True
    batch_compatible: ClassVar[bool] = True
    training_free: ClassVar[bool] = True

    def n_drop(self, n_layers: int) -> int:
        """Fewest layers whose removal brings the fraction of layer work to at most the budget."""
        return min(n_layers - 1, max(0, math.ceil((1.0 - self.budget) * n_layers - 1e-9)))

    def _healed(self, engine: Engine) -> bool:
        """Load the heal adapter this policy names, if any: its dropped layers and their replacements."""
        if self.heal == "none":
            return False
        if self.heal == "auto":
            p = shipped_adapter(getattr(engine, "name", ""), f"layer-heal-{self.budget:g}")
            if p is None:
                return False
        else:
            p = self.heal
        reps, card = load_replacements(p, engine.model, engine.dtype, engine.device)
        if abs(float(card.get("budget", -1)) - self.budget) > 1e-9:
            raise PonderError(f"heal adapter {p} was trained for budget {card.get('budget')}, not {self.budget:g}; "
                              f"train one with `ponder train layer-heal --budget {self.budget:g}`")
        self.replacements, self.heal_card, self.dropped = reps, card, sorted(reps)
        return True

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        if self._healed(engine):
            return
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
        return StaticPlanner([LayerPlan.skip(engine.device, kv="none", replace=self.replacements.get(i))
                              if i in self.dropped else None for i in range(L)])

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k not in ("replacements", "heal_card")}

    def describe(self) -> dict:
        d = super().describe()
        if self.heal_card:  # a trained stand-in runs: not training-free, and the row says which
            d["training_free"] = False
            d["heal_used"] = {k: self.heal_card.get(k) for k in ("rank", "base_fingerprint", "dropped")}
        return d
