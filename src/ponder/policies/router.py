"""A learned skip router: per token and layer, a trained decision to run or skip the attention and the FFN.

After Router-Tuning / MindSkip (a small router per layer on a frozen model, trained on the model's own outputs) and
the skip routers of Duo-LLM and FlexiDepth: before each layer a linear map of the token's RMS-normalised input state
gives a run-logit per unit (attention, FFN; or one for the whole layer, as the adapter was trained), and a unit runs
where the logit plus an offset is positive. The router is an adapter (``ponder train router``); the offset is the
policy's threshold, fitted on calibration text so the realized fraction meets the budget (a router trained at one
budget serves a neighbouring one by moving the offset; the row says which router ran).

KV. A token that skips a layer's attention still leaves that layer's K/V, projected from its incoming state
(``kv="compute"``), exactly as the router was trained (every token's keys are visible to later queries); the
projection is counted. So decisions depend only on the token's own states: cached decoding equals recomputation and
a batch equals its rows alone. At batch 1 each unit either runs or is not read at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..engine.forward import Engine, PlannerBase, StepContext
from ..engine.plan import LayerPlan
from ..errors import PonderError
from ..models.adapters import Router, load_router, shipped_dir
from .base import per_engine
from .budget import ThresholdPolicy
from .registry import register


def shipped_routers(model_name: str) -> dict[float, Path]:
    """The routers shipped for a catalogue model, by the budget they were trained at (``router-<budget>``)."""
    d = shipped_dir(model_name)
    out: dict[float, Path] = {}
    for p in sorted(d.glob("router-*.safetensors")) if d is not None else []:
        try:
            out[float(p.name[len("router-"):-len(".safetensors")])] = p
        except ValueError:
            continue
    return out


def router_for(engine: Engine, spec: str, budget: float) -> Router:
    """``"auto"``: the router shipped for this model at this budget, else the one trained at the nearest budget;
    otherwise an adapter's path. Refused with one line when there is none or it was trained for another base."""
    if spec == "auto":
        got = shipped_routers(getattr(engine, "name", ""))
        if not got:
            raise PonderError(f"no router is shipped for model {getattr(engine, 'name', '?')!r}; train one with "
                              "`ponder train router --model ... --budget B` and pass router=PATH")
        path = got[min(got, key=lambda b: (abs(b - budget), -b))]
    else:
        path = Path(spec)
    try:  # a file rewritten in place (a retrained router) is another router
        st = path.stat()
        stamp: tuple = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = ()
    return per_engine(engine, ("router", str(path), stamp), lambda: load_router(path, engine.model, engine.device))


class RouterPlanner(PlannerBase):
    """Why a one-token step decides in Python: at batch-1 decode the check runs once per layer, and building index
    tensors from a mask costs more than the decision; four prebuilt plans cover every (attention, FFN) choice."""

    def __init__(self, engine: Engine, router: Router, offset: float):
        self.r, self.off, self.D = router, offset, engine.cfg.hidden_size
        self.whole = router.units == "layer"
        e = torch.empty(0, dtype=torch.long, device=engine.device)
        self.one = {(True, True): None, (True, False): LayerPlan(attn=None, ffn=e, kv="compute"),
                    (False, True): LayerPlan(attn=e, ffn=None, kv="compute"),
                    (False, False): LayerPlan(attn=e, ffn=e, kv="compute")}
        self.fpr = router.flops_per_row()

    def decide(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(N, 2) bool: run attention, run FFN, for the rows of ``x`` (N, D)."""
        run = (self.r.logits(i, x) + self.off) > 0
        return run.expand(-1, 2) if self.whole else run

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        N = ctx.B * ctx.T
        if ctx.stats is not None:
            ctx.stats.add_overhead(self.fpr * N)
        run = self.decide(i, x.reshape(N, self.D))
        if N == 1:
            a, f = run.reshape(2).tolist()
            return self.one[a, f]
        return LayerPlan.from_masks(run[:, 0], run[:, 1], kv="compute")


@register
@dataclass
class SkipRouter(ThresholdPolicy):
    """Per token and layer, a trained router runs or skips attention and FFN (Router-Tuning / MindSkip style)."""

    name: ClassVar[str] = "router"
    training_free: ClassVar[bool] = False
    adapter_kind: ClassVar[str] = "router"  # what it needs: a trained adapter (the test matrix trains one)
    cheap: ClassVar[float] = -50.0  # an offset under which no unit runs
    dear: ClassVar[float] = 50.0  # and over which every unit does
    router: str = "auto"  # "auto": the router shipped for this model (nearest trained budget), or an adapter's path
    router_card: dict = field(default_factory=dict, repr=False, compare=False)

    def _router(self, engine: Engine) -> Router:
        r = router_for(engine, self.router, self.budget)
        self.router_card = r.card
        return r

    def _planner(self, engine: Engine, threshold: float) -> RouterPlanner:
        return RouterPlanner(engine, self._router(engine), threshold)

    def planner(self, engine: Engine):
        if self.budget >= 1.0 and self.threshold is None:
            self._router(engine)  # a missing or mismatched router is refused at every budget
        return super().planner(engine)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if k != "router_card"}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.router_card:
            d["router_used"] = {k: self.router_card.get(k) for k in ("budget", "units", "estimator",
                                                                      "base_fingerprint")}
        return d
