"""SkipDecode: one monotone exit depth per position, shared by the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIB, score_stats
from ponder.engine import SamplingConfig, Stats
from ponder.engine.stats import ATTN, FFN
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.skipdecode import schedule

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5, 0.3])
def test_skipdecode_schedule_is_monotone_and_meets_budget(budget):
    n = schedule(12, 1, budget, 50)
    assert bool((n[1:] >= n[:-1]).all()) and int(n.max()) <= 10
    assert 1 - float(n.double().mean()) / 12 <= budget + 1e-9
    assert 1 - float(n.double().mean()) / 12 > budget - 0.1  # and does not waste the budget


def test_skipdecode_refuses_below_its_floor():
    with pytest.raises(PonderError, match="minimum reachable budget is 0.167"):
        schedule(12, 1, 0.1, 10)


def test_skipdecode_decode_steps_share_one_depth_and_cache_stays_consistent(eng):
    pol = registry.get("skipdecode", 0.5)
    prompts = [[5, 6, 7, 8, 9], [40, 41], [60, 61, 62]]
    sc = SamplingConfig(max_new_tokens=12)
    st = Stats(eng.cfg)
    res = pol.generate(eng, prompts, sc, st)
    maps = st.unit_maps
    assert bool(((maps[0] & (ATTN | FFN)) > 0).all())  # the prompt runs the full model
    depths = []
    for m in maps[1:]:  # each decode step: one plan for the whole batch, whole layers
        run = (m & (ATTN | FFN)) > 0  # (B, 1, L)
        assert bool((run == run[:1]).all())
        assert bool(run[0, 0, 0]) and bool(run[0, 0, -1])  # first (keep_first=1) and top layers run
        depths.append(int(run[0, 0].sum()))
        skipped = (~run[0, 0]).nonzero().flatten().tolist()
        assert skipped == list(range(1, 1 + len(skipped)))  # a contiguous block of lower-middle layers
    assert depths == sorted(depths, reverse=True) and depths[0] > depths[-1]
    L = eng.cfg.num_hidden_layers
    assert sum(depths) / (L * len(depths)) <= 0.5 + 1e-9
    # KV: every layer a decode token runs was run by all earlier tokens (so no K/V it reads is missing)
    for a in range(len(maps) - 1):
        ra = (maps[a][0, -1] & ATTN) > 0
        rb = (maps[a + 1][0, 0] & ATTN) > 0
        assert bool((ra | ~rb).all())
    assert res.tokens == [pol.generate(eng, [p], sc).tokens[0] for p in prompts]


def test_skipdecode_scoring_flops_match_the_schedule(eng):
    pol = registry.get("skipdecode", 0.6)
    _, st = score_stats(eng, pol, torch.tensor(CALIB[:2]))
    assert st.flops_fraction <= 0.6 + 1e-6
    used = st.layers_used()[0][0]
    assert bool((used[1:] <= used[:-1]).all()) and int(used[0]) == 8
