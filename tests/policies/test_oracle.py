"""The oracle: exits at the first layer whose top-1 equals dense (an upper bound, not real)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import CALIB, score_stats
from ponder.policies import registry

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


def test_oracle_tokens_that_exit_early_agree_with_dense(eng):
    pol = registry.get("oracle", 0.999)
    pol.calibrate(eng, CALIB)
    assert not pol.real and pol.calibration["cap"] == 8  # at its natural fraction or above: no cap
    ids = torch.tensor(CALIB[:3])
    out, st = score_stats(eng, pol, ids)
    used = st.layers_used()[0]
    early = used < 8
    assert bool(early.any())
    dense_top = eng.forward(ids).logits.argmax(-1)
    assert bool((out.argmax(-1) == dense_top)[early].all())


def test_oracle_budget_sets_floor_or_cap(eng):
    lo = registry.get("oracle", 0.3)
    lo.calibrate(eng, CALIB)
    assert lo.calibration["floor"] == 1 and lo.calibration["cap"] < 8
    assert lo.calibration["calibration_fraction"] <= 0.3
    natural = lo.calibration["natural_fraction"]
    hi = registry.get("oracle", min(0.99, natural + 0.1))
    hi.calibrate(eng, CALIB)
    assert hi.calibration["cap"] == 8 and hi.calibration["floor"] >= 1
    assert hi.calibration["calibration_fraction"] <= hi.budget
