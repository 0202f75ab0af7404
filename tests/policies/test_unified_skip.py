"""unified-skip: the same layers skipped for every token, spread through the middle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIB, TOL, score_stats
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.unified_skip import spread

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


def test_unified_skip_count_follows_budget_and_spreads_through_the_middle(eng):
    assert spread(list(range(1, 11)), 3) == [2, 6, 9]
    assert spread(list(range(1, 11)), 10) == list(range(1, 11))
    for budget, k in ((1.0, 0), (0.9, 1), (0.875, 1), (0.8, 2), (0.5, 4), (0.25, 6)):
        skipped = registry.get("unified-skip", budget).skipped(eng)
        assert len(skipped) == k and 0 not in skipped and 7 not in skipped
    with pytest.raises(PonderError, match="minimum reachable budget is 0.250"):
        registry.get("unified-skip", 0.2).planner(eng)


def test_unified_skip_is_the_model_without_those_layers(eng, tiny_folder):
    from ponder.engine.forward import Engine
    from ponder.models.loader import load_folder

    pol = registry.get("unified-skip", 0.75)
    skipped = pol.skipped(eng)
    ids = torch.tensor(CALIB[:2])
    out, st = score_stats(eng, pol, ids)
    m, _ = load_folder(tiny_folder("llama", layers=8)[0])
    for i in sorted(skipped, reverse=True):
        del m.model.layers[i]
    m.config.num_hidden_layers -= len(skipped)
    assert (out - Engine(m).forward(ids).logits).abs().max() < TOL
    assert st.flops_fraction == pytest.approx(6 / 8) and st.weight_bytes_fraction == pytest.approx(6 / 8)
