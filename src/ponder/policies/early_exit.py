"""Confidence early exit: a token leaves after layer ``l`` once the shared head is confident enough about it.

At a few check depths (default: every ``L/4`` layers from ``L/4`` on, to bound the cost) the still-running tokens'
hidden states go through the final norm and the shared LM head; a token whose maximum softmax probability (or
normalised negative entropy) reaches the threshold stops. Its final logits come from its frozen exit state. The
head is expensive (for the shipped model one head call costs about 2.7 layers), so every check is counted as policy
overhead in the FLOPs fraction; that is why checks are sparse.

What an exited token leaves in the KV cache of the layers it skipped (``kv_fill``), since later tokens attend there:

- ``"state"`` (default): its hidden state is frozen at exit and each skipped layer projects K/V from it (CALM's
  state propagation; costs the K/V projections, about 8% of a layer each). The projections for all skipped layers
  run at once when the token leaves (``Engine.exit_kv``), and the later layers are told ``kv="filled"``;
- ``"kv-copy"``: each skipped layer copies the K/V the token produced in the last layer it ran, with no projection
  (``kv="copy"``; the "state copying" FFN-SkipLLM blames for factual collapse: later tokens read K/V computed for
  another layer's weights);
- ``"none"``: nothing; the slot is masked for later tokens (``kv="none"``), which lose sight of that token there.

The threshold is fitted by bisection on calibration text so the realized fraction (checks included) meets the budget.
``measure="saturation"`` replaces the head by CALM's hidden-state saturation (the cosine between the states entering
and leaving the previous layer; O(d) per token), for models whose head is too expensive to consult: the exited
token's prediction still comes from the shared head, once, at the end.

Decisions use only the token's own state, so batching and caching do not change them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..engine.forward import Engine, PlannerBase, StepContext
from ..engine.plan import LayerPlan
from ..errors import PonderError
from ..models.adapters import Translators
from .base import LENSES, exit_lens, lens_name
from .budget import ThresholdPolicy
from .registry import register

KV_FILL = {"state": "compute", "kv-copy": "copy", "none": "none"}
MEASURES = ("maxprob", "entropy", "saturation")


def check_kv_fill(kv_fill: str) -> str:
    if kv_fill not in KV_FILL:
        raise PonderError(f"kv_fill must be one of {', '.join(KV_FILL)}, not {kv_fill!r}")
    return KV_FILL[kv_fill]


class ExitPlanner(PlannerBase):
    """Rows still running, per step; a subclass decides at check depths which of them leave before layer ``i``."""

    def __init__(self, engine: Engine, kv_fill: str):
        self.engine = engine
        self.kv = check_kv_fill(kv_fill)
        self.plan_kv = "filled" if self.kv == "compute" else self.kv  # leavers' K/V are written at exit
        self.rows: torch.Tensor | None = None  # flat indices of the rows still running, ascending
        self.check_logits: torch.Tensor | None = None  # set by ``leave`` when its check computed the head
        self._known: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, logits) of this step's leavers
        self._gone: LayerPlan | None = None

    def checks_at(self, i: int) -> bool:
        raise NotImplementedError

    def known_logits(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat rows, logits) of this step's tokens whose final logits an exit check already computed."""
        if not self._known:
            return None
        if len(self._known) == 1:
            return self._known[0]
        return torch.cat([r for r, _ in self._known]), torch.cat([lg for _, lg in self._known])

    def leave(self, i: int, h: torch.Tensor, rows: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Boolean (n,) over the running rows ``rows`` (flat indices), given their states ``h`` (n, D)."""
        raise NotImplementedError

    def begin(self, x: torch.Tensor, ctx: StepContext) -> None:
        """Called at layer 0 of every step."""

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        N = ctx.B * ctx.T
        if i == 0:
            self.rows = torch.arange(N, device=x.device)
            self._known = []
            self.begin(x, ctx)
        rows = self.rows
        if self.checks_at(i) and rows.numel():
            h = x.reshape(-1, x.shape[-1])[rows]
            self.check_logits = None
            out = self.leave(i, h, rows, ctx)
            if rows.numel() == 1:  # one running token (batch-1 decode): a Python branch instead of three gathers
                if bool(out):
                    if self.kv == "compute":
                        self.engine.exit_kv(i, rows, h, ctx)
                    if self.check_logits is not None:
                        self._known.append((rows, self.check_logits))
                    self.rows = rows = rows[:0]
            elif bool(out.any()):
                # The leavers' states are frozen from here on: write their K/V for every remaining layer now, and
                # keep the logits the check computed from those very states (the step's output for them).
                if self.kv == "compute":
                    self.engine.exit_kv(i, rows[out], h[out], ctx)
                if self.check_logits is not None:
                    self._known.append((rows[out], self.check_logits[out]))
                self.rows = rows = rows[~out]  # the running set only shrinks: no mask to rescan every layer
        if rows.numel() == N:
            return None
        if not rows.numel():  # every token has left: the same plan for each remaining layer, built once
            if self._gone is None:
                self._gone = LayerPlan(attn=rows, ffn=rows, kv=self.plan_kv)
            return self._gone
        return LayerPlan(attn=rows, ffn=rows, kv=self.plan_kv)


def confidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """In [0, 1]: the maximum softmax probability, or 1 - entropy / log(V)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if kind == "maxprob":
        return lp.max(-1).values.exp()
    ent = -(lp.exp() * lp).sum(-1)
    return 1.0 - ent / math.log(logits.shape[-1])


class EarlyExitPlanner(ExitPlanner):
    def __init__(self, engine: Engine, kv_fill: str, threshold: float, checks: list[int], measure_kind: str,
                 lens: Translators | None = None):
        super().__init__(engine, kv_fill)
        self.lens = lens
        self.thr = threshold
        self.checks = set(checks)
        self.kind = measure_kind
        self.prev: torch.Tensor | None = None  # (saturation) the states entering the previous layer

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        plan = super().layer(i, x, ctx)
        if self.kind == "saturation":
            self.prev = x
        return plan

    def checks_at(self, i: int) -> bool:
        return i in self.checks

    def leave(self, i: int, h: torch.Tensor, rows: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.kind == "saturation":  # CALM's state saturation: the last layer barely turned the token's state
            if ctx.stats is not None:
                ctx.stats.add_overhead(6.0 * h.shape[0] * h.shape[1])
            prev = self.prev.reshape(-1, h.shape[-1])[rows]
            return F.cosine_similarity(prev.float(), h.float(), dim=-1) >= self.thr
        if ctx.stats is not None:
            ctx.stats.add_head_check(h.shape[0])
        self.check_logits = self.engine.logits(h if self.lens is None else self.lens(i, h))
        return confidence(self.check_logits, self.kind) >= self.thr


@register
@dataclass
class EarlyExit(ThresholdPolicy):
    """Leave after layer l when the shared head's confidence passes a calibrated threshold (checks cost overhead)."""

    name: ClassVar[str] = "early-exit"
    kv_fill: str = "state"  # "state" | "kv-copy" | "none": what skipped layers' KV slots get
    first_check: int | None = None  # first depth checked (default L // 4, at least 1)
    every: int | None = None  # depth between checks (default L // 4, at least 1)
    measure: str = "maxprob"  # "maxprob" | "entropy" (the head) | "saturation" (cosine of consecutive states)
    # what an exit decodes through: "auto" (the model's shipped exit translators when present), "plain" (the
    # final norm and head: the logit lens), or a translators adapter's path
    lens: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kv_fill(self.kv_fill)
        if self.measure not in MEASURES:
            raise PonderError(f"measure must be one of {', '.join(MEASURES)}, not {self.measure!r}")
        if self.measure == "saturation" and self.lens not in LENSES:
            raise PonderError("measure=saturation decodes an exited token through the final head at the end of the "
                              "step; a translators lens applies to the head-based measures (maxprob, entropy)")

    def _lens(self, engine: Engine) -> Translators | None:
        return None if self.measure == "saturation" else exit_lens(engine, self.lens)

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        super().calibrate(engine, texts)
        if self.fitted_for(engine):
            self.calibration["lens_used"] = lens_name(self._lens(engine))

    def describe(self) -> dict:
        d = super().describe()
        if "lens_used" in self.calibration:
            d["lens_used"] = self.calibration["lens_used"]
        return d

    @property
    def cheap(self) -> float:  # the threshold at which every token leaves at the first check
        return -1.0 if self.measure == "saturation" else 0.0

    def checks(self, engine: Engine) -> list[int]:
        L = engine.cfg.num_hidden_layers
        first = self.first_check if self.first_check is not None else max(1, L // 4)
        every = self.every if self.every is not None else max(1, L // 4)
        if not 1 <= first < L or every < 1:
            raise PonderError(f"early-exit checks need 1 <= first_check < {L} and every >= 1")
        return list(range(first, L, every))

    def _planner(self, engine: Engine, threshold: float) -> EarlyExitPlanner:
        return EarlyExitPlanner(engine, self.kv_fill, threshold, self.checks(engine), self.measure,
                                self._lens(engine))
