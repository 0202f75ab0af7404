"""The encoder policy interface: one budget knob, the usual flags, and a per-call reducer for the encoder engine.

``budget`` is the fraction of dense encoder FLOPs (projections, attention core and FFN over the real tokens, the
policy's own deciding work included), as :class:`~ponder.encoders.engine.EncoderStats` counts it. Each policy maps
the budget to its own knob (a keep ratio, a merge ratio, an exit threshold, a layer count) by measuring on the
calibration split, so a budget means the same amount of work for every policy. Budget 1.0 is the dense model.

Flag meanings for encoders: ``kv_compatible`` has nothing to be compatible with (an encoder keeps no KV cache)
and is True by convention; ``batch_compatible`` means a text embedded in a padded batch equals it embedded alone
(every decision here is per text: keep counts come from the text's own length, thresholds are per token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import PonderError
from ...policies.base import Policy, per_engine, text_key
from ...policies.budget import fit_threshold
from ..engine import EncoderStats
from ..run import calibration_seqs, encode_ids

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import EncoderEngine, Reducer


FIT_TEXTS = 64  # calibration texts per bisection step (the FLOPs fraction is an average: 64 texts pin it to ~1 %)


@dataclass
class EncoderPolicy(Policy):
    name: ClassVar[str] = "encoder-base"
    kv_compatible: ClassVar[bool] = True  # N/A (no KV cache in an encoder); see the module docstring
    knob_name: ClassVar[str] = ""  # the dataclass field the budget is fitted into (None until fitted)
    knob_range: ClassVar[tuple[float, float, bool, int] | None] = None  # (lo, hi, cheaper_when_low, iterations)

    def calibrate(self, engine: EncoderEngine, seqs: list[list[int]]) -> None:  # type: ignore[override]
        """Fit the knob to the budget on calibration token sequences (never the evaluation texts). A knob given
        explicitly is kept as is."""
        if self.knob_range is None or self.budget >= 1.0 or getattr(self, self.knob_name) is not None:
            return
        lo, hi, cheaper_when_low, iters = self.knob_range
        self.fit(engine, seqs, lambda v: setattr(self, self.knob_name, v), lo, hi, cheaper_when_low, iters)

    def knob(self) -> float | None:
        """The fitted (or given) knob; None at budget 1 without one (dense). Raises when fitting was skipped."""
        v = getattr(self, self.knob_name)
        if v is None and self.budget < 1.0:
            raise PonderError(f"{self.name} is not calibrated; call calibrate() first (ponder.embed does it)")
        return v

    def reducer(self, engine: EncoderEngine) -> Reducer | None:
        """A fresh reducer for one batch; None runs the dense path."""
        return None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        cal = getattr(self, "calibration", None)
        if cal:
            d["calibration"] = cal
        return d

    def linear_maps(self, engine: EncoderEngine) -> dict:
        """The engine's affine maps from layer-l states to last-layer states, fitted on the calibration split."""
        seqs = calibration_seqs(engine)
        return per_engine(engine, ("encoder-linear-maps", text_key(seqs)), lambda: engine.extrapolators(seqs))

    # ---- shared by the knob-fitting policies --------------------------------------------------------------------
    def measure(self, engine: EncoderEngine, seqs: list[list[int]]) -> float:
        """FLOPs fraction this policy, as currently set, spends on ``seqs`` (batched as the bench batches)."""
        st = EncoderStats(engine.cfg)
        encode_ids(engine, seqs, self, 32, st)
        return st.flops_fraction

    def fit(self, engine: EncoderEngine, seqs: list[list[int]], set_knob: Callable[[float], None],
            lo: float, hi: float, cheaper_when_low: bool, iters: int = 9) -> None:
        """Bisection for the knob value that spends at most ``budget`` (as close to it as the knob allows).
        ``cheaper_when_low``: a lower knob value means less work (keep ratios, thresholds)."""
        if not seqs:
            raise PonderError("the encoder calibration split (data/retrieval/calib.jsonl) is missing; reinstall "
                              "ponder from its repository")
        seqs = seqs[:FIT_TEXTS]
        target = self.budget
        cheap, rich = (lo, hi) if cheaper_when_low else (hi, lo)

        def fraction_at(v: float) -> float:
            set_knob(v)
            return self.measure(engine, seqs)

        # the decoder's fit, so an unreachable budget is refused the same way everywhere (one line naming the
        # minimum reachable budget; the bench records the point as not measured)
        best, best_f = fit_threshold(fraction_at, target, cheap, rich, iters=iters, what=self.name, tol=0.0)
        set_knob(best)
        self.calibration = {self.knob_name: round(best, 6), "calib_flops_fraction": round(best_f, 4)}


def geometric_keep(ratio: float, j: int) -> float:
    """Cumulative keep fraction after the j-th (0-based) reduction point of a geometric schedule."""
    return ratio ** (j + 1)


def ceil_count(frac: float, n: int) -> int:
    return int(math.ceil(frac * n - 1e-9))


def layer_tuple(v: Any) -> tuple[int, ...] | None:
    """A layer list given as an int, a list or a tuple (CLI parameters), sorted."""
    if v is None:
        return None
    return tuple(sorted(int(i) for i in (v if isinstance(v, (list, tuple)) else [v])))
