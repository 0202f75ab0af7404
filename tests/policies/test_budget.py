"""The budget controller: threshold bisection and the realized budget on other text."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CALIB
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.budget import fit_threshold, realized

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


def test_fit_threshold_finds_the_largest_threshold_within_budget():
    f = lambda t: 0.3 + 0.7 * t  # fraction grows with the threshold
    thr, frac = fit_threshold(f, 0.65, cheap=0.0, dear=1.0, iters=30)
    assert frac <= 0.65 and thr == pytest.approx(0.5, abs=1e-6)
    assert fit_threshold(f, 1.0, 0.0, 1.0) == (1.0, 1.0)
    with pytest.raises(PonderError, match="minimum reachable budget is 0.300"):
        fit_threshold(f, 0.2, 0.0, 1.0)


def test_realized_reports_spread(eng):
    pol = registry.get("early-exit", 0.8)
    pol.calibrate(eng, CALIB)
    r = realized(eng, pol, CALIB)
    assert len(r.per_sample) == len(CALIB) and min(r.per_sample) <= r.fraction <= max(r.per_sample)
    assert set(r.summary()) >= {"fraction", "std", "min", "max", "samples", "tokens"}
