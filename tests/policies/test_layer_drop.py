"""layer-drop: the same least important layers removed for every token."""

from __future__ import annotations

import pytest
import torch

import ponder.api as api
from conftest import TOL
from ponder.engine import Stats
from ponder.policies import registry
from ponder.policies.layer_drop import LayerDrop, layer_importance


@pytest.mark.parametrize("budget,n", [(1.0, 0), (0.9, 1), (0.75, 2), (0.5, 4), (0.05, 7)])
def test_layer_drop_count_respects_budget(budget, n):
    assert LayerDrop(budget=budget).n_drop(8) == n


def test_layer_drop_drops_least_important_layers_and_stays_cache_exact(tiny_folder):
    eng = api.load(tiny_folder("llama", layers=6)[0])
    gen = torch.Generator().manual_seed(4)
    calib = [torch.randint(3, 97, (64,), generator=gen).tolist() for _ in range(3)]
    pol = registry.get("layer-drop", 0.5)
    pol.calibrate(eng, calib)
    assert len(pol.dropped) == 3 and pol.dropped == sorted(set(pol.dropped))
    scores = layer_importance(eng, calib)
    kept = [i for i in range(6) if i not in pol.dropped]
    assert max(scores[i] for i in pol.dropped) <= min(scores[i] for i in kept)
    st = Stats(eng.cfg)
    ids = torch.randint(3, 97, (1, 20), generator=gen)
    full = eng.forward(ids, None, pol.planner(eng), st).logits
    assert st.flops_fraction <= 0.5 + 1e-9 and st.weight_bytes_fraction == pytest.approx(0.5)
    cache = eng.new_cache(1, 20)
    planner = pol.planner(eng)
    eng.forward(ids[:, :5], cache, planner)
    steps = [eng.forward(ids[:, t:t + 1], cache, planner, phase="decode").logits[:, 0] for t in range(5, 20)]
    assert (torch.stack(steps, 1) - full[:, 5:]).abs().max() < TOL
