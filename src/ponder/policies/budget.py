"""From a budget to a threshold: monotone search on calibration text, and the realized budget on any text.

Adaptive policies (ffn-skip, early-exit) have a threshold, not a budget: how much they compute depends on the text.
The controller runs the policy itself (real plans, engine-counted FLOPs, overhead included) over calibration
sequences and bisects the threshold until the realized fraction meets the budget. Because the fraction is measured
and not modelled, interactions the model would miss (a skipped FFN changes the next layer's saturation, an exited
token changes later tokens' attention) are part of the fit.

A calibrated budget is a promise about the calibration text only. ``realized`` measures the same quantity on other
text (the evaluation data) and reports its spread across samples, so a report can show how far the promise carries.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..engine.forward import Engine, Planner
from ..engine.stats import Stats
from ..errors import PonderError
from .base import Calibrated
from .calibration import calibration_ids


@dataclass
class Realized:
    """Executed over dense per-token layer FLOPs (policy overhead included), overall and per sample."""

    fraction: float
    per_sample: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def std(self) -> float:
        return statistics.pstdev(self.per_sample) if len(self.per_sample) > 1 else 0.0

    def summary(self) -> dict:
        p = self.per_sample
        return {"fraction": round(self.fraction, 4), "std": round(self.std, 4),
                "min": round(min(p), 4) if p else None, "max": round(max(p), 4) if p else None,
                "samples": len(p), "tokens": self.tokens}


def _batches(seqs: list[list[int]], per_sample: bool) -> list[list[list[int]]]:
    if per_sample:
        return [[s] for s in seqs]
    by_len: dict[int, list[list[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for group in by_len.values():
        out += [group[i:i + 16] for i in range(0, len(group), 16)]
    return out


@torch.inference_mode()
def measure(engine: Engine, make_planner: Callable[[], Planner | None], seqs: list[list[int]],
            per_sample: bool = True) -> Realized:
    """Run the planner over each sequence (scoring-style forward, no LM head) and count what the engine did.

    ``per_sample=False`` batches equal-length sequences (faster; no spread), for the inner loop of a search."""
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise PonderError("no calibration sequences of at least two tokens were given")
    work = dense = 0.0
    per: list[float] = []
    n = 0
    for group in _batches(seqs, per_sample):
        st = Stats(engine.cfg, record_tokens=False)
        ids = torch.tensor(group, dtype=torch.long, device=engine.device)
        engine.forward(ids, None, make_planner(), st, logits=None, phase="score")
        work += st.flops + st.overhead_flops
        dense += st.dense_flops
        n += ids.numel()
        if per_sample:
            per.append(st.flops_fraction)
    return Realized(work / dense, per, n)


def realized(engine: Engine, policy, seqs: list[list[int]]) -> Realized:
    """The realized budget of a (calibrated) policy on any token sequences, e.g. windows of the evaluation text."""
    return measure(engine, lambda: policy.planner(engine), seqs, per_sample=True)


FIT_TOLERANCE = 0.005  # a fit within this much under the budget is done: the promise is +-0.03 on other text


def fit_threshold(fraction_at: Callable[[float], float], budget: float, cheap: float, dear: float,
                  iters: int = 14, what: str = "policy", tol: float = FIT_TOLERANCE) -> tuple[float, float]:
    """Bisect between ``cheap`` (threshold of least compute) and ``dear`` (most compute) for the threshold closest to
    ``dear`` whose fraction is still <= budget. Returns (threshold, its fraction).

    Assumes the fraction moves monotonically from one end to the other (true up to small interactions; the returned
    threshold always has a *measured* fraction within budget). Raises PonderError when even ``cheap`` is over budget.
    """
    f_cheap = fraction_at(cheap)
    if f_cheap > budget:
        raise PonderError(f"{what} cannot reach budget {budget:g} on this model: its minimum reachable budget is "
                          f"{math.ceil(f_cheap * 1000) / 1000:.3f} of dense (measured on the calibration text); "
                          "use a larger --budget")
    f_dear = fraction_at(dear)
    if f_dear <= budget:
        return dear, f_dear
    return bisect(fraction_at, budget, cheap, dear, f_cheap, iters, tol)


def bisect(fraction_at: Callable[[float], float], budget: float, cheap: float, dear: float, f_cheap: float,
           iters: int, tol: float = 0.0) -> tuple[float, float]:
    """Up to ``iters`` halvings between ``cheap`` (known within budget: ``f_cheap``) and ``dear``: the setting nearest
    ``dear`` whose measured fraction is still <= budget, and that fraction; it stops early at a setting within
    ``tol`` under the budget (each halving is a forward over the calibration text: on a 30-layer model, seconds).
    Shared by every knob fit (decoder thresholds here, encoder keep ratios and thresholds in
    ``encoders.policies.base``)."""
    lo, hi, f_lo = cheap, dear, f_cheap
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = fraction_at(mid)
        if f <= budget:
            lo, f_lo = mid, f
            if budget - f <= tol:
                break
        else:
            hi = mid
    return lo, f_lo


def shipped_calibration(engine: Engine) -> list[list[int]]:
    """The shipped calibration text (never the evaluation data) as token sequences; [] when it cannot serve this
    model (no tokenizer, no data/calib.txt, or a tokenizer that maps outside the model's vocabulary)."""
    try:
        seqs = calibration_ids(engine)
    except FileNotFoundError:
        return []
    V = engine.cfg.vocab_size
    return [s for s in seqs if s and max(s) < V]


def default_calibration(engine: Engine) -> list[list[int]]:
    """For policies used without an explicit ``calibrate``: the shipped calibration text, or a clear error."""
    seqs = shipped_calibration(engine)
    if not seqs:
        raise PonderError("this policy needs calibration but no usable calibration text is available (no tokenizer, "
                          "no data/calib.txt, or token ids outside the vocabulary); call "
                          "policy.calibrate(engine, token_sequences) or pass an explicit threshold")
    return seqs


@dataclass
class ThresholdPolicy(Calibrated):
    """A policy steered by one threshold: given explicitly, or fitted to the budget on calibration text.

    Subclasses set ``cheap`` / ``dear`` (the thresholds of least and most compute) and build planners."""

    threshold: float | None = None  # None: fitted to the budget by calibrate

    cheap: ClassVar[float] = 0.0
    dear: ClassVar[float] = 1.0 + 1e-6

    def _planner(self, engine: Engine, threshold: float) -> Planner:
        raise NotImplementedError

    def _precheck(self, engine: Engine) -> None:
        """Refuse a budget known to be unreachable before spending calibration time."""

    def describe(self) -> dict[str, Any]:
        """With the fitted threshold: a ``threshold: null`` in a run's output would hide what actually ran."""
        d = super().describe()
        for k in ("threshold", "calibration_fraction"):
            if k in self.calibration:
                d[f"fitted_{k}" if k == "threshold" else k] = self.calibration[k]
        return d

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        if self.budget >= 1.0 or self.threshold is not None:
            return
        self._precheck(engine)
        frac = lambda t: measure(engine, lambda: self._planner(engine, t), texts, per_sample=False).fraction
        thr, f = fit_threshold(frac, self.budget, self.cheap, self.dear, what=self.name)
        self.fitted(engine, {"threshold": thr, "calibration_fraction": f})

    def planner(self, engine: Engine) -> Planner | None:
        if self.threshold is not None:
            return self._planner(engine, self.threshold)
        if self.budget >= 1.0:
            return None
        if not self.fitted_for(engine):
            self.calibrate(engine, default_calibration(engine))
        return self._planner(engine, self.calibration["threshold"])
