"""ffn-skip: per-token FFN skipping by cosine saturation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIB
from ponder.engine import SamplingConfig, Stats
from ponder.engine.stats import ATTN, FFN
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.budget import realized

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


def test_ffn_skip_keeps_attention_warmup_and_protected_layers(eng):
    pol = registry.get("ffn-skip", threshold=0.0)  # explicit, permissive threshold: lots of skipping
    ids = torch.tensor(CALIB[:3])
    cache = eng.new_cache(3, 40)
    st = Stats(eng.cfg)
    eng.forward(ids, cache, pol.planner(eng), st, phase="prefill")
    m = st.unit_maps[0]  # (B, T, L)
    assert bool(((m & ATTN) > 0).all())  # attention (hence K/V) everywhere
    assert not cache.holes
    ffn = (m & FFN) > 0
    assert bool(ffn[:, :pol.warmup].all())  # warm-up positions run every FFN
    assert bool(ffn[:, :, 0].all()) and bool(ffn[:, :, -1].all())  # protected layers
    assert not bool(ffn[:, pol.warmup:, 1:-1].all())  # and something was skipped
    # sticky: once a token stops running FFNs in the middle, it does not start again
    mid = ffn[:, :, 1:-1].long()
    assert bool((mid[..., 1:] <= mid[..., :-1]).all())


def test_ffn_skip_stops_deciding_once_every_row_skips(eng):
    """Sticky skipping: when every row of a step already skips, later layers compute no saturation at all (and
    count none), and the plan is the same FFN-less plan for each of them."""
    pol = registry.get("ffn-skip", threshold=-1.0)  # everything past warm-up saturates at the first check
    ids = torch.tensor([CALIB[0][:12], CALIB[1][:12]])
    cache, pl = eng.new_cache(2, 13), pol.planner(eng)
    eng.forward(ids, cache, pl, phase="prefill")
    st = Stats(eng.cfg)
    eng.forward(ids[:, :1], cache, pl, st, phase="decode")  # position 12 >= warm-up: both rows skip
    assert st.overhead_flops == pytest.approx(6.0 * eng.cfg.hidden_size * 2)  # one check, at the first layer
    m = st.unit_maps[0]
    L = eng.cfg.num_hidden_layers
    assert bool(((m[..., 1:L - 1] & FFN) == 0).all()) and bool(((m[..., [0, L - 1]] & FFN) > 0).all())


def test_ffn_skip_one_token_steps_decide_exactly_as_a_batch(eng):
    """A single-token decode step decides in Python floats, a batch in tensors: both must make the same decision
    for every token and layer (the same float32 sums, the same float64 cosine), not merely similar ones."""
    pol = registry.get("ffn-skip", 0.75)
    pol.calibrate(eng, CALIB)
    prompts = [CALIB[3][:9], CALIB[4][:5], CALIB[5][:12]]
    sc = SamplingConfig(max_new_tokens=10, stop_tokens=())

    def decode_ffn(ps):
        st = Stats(eng.cfg, record_tokens=True)
        toks = pol.generate(eng, ps, sc, st).tokens
        return toks, torch.stack([(m[:, 0] & FFN) > 0 for m in st.unit_maps[1:]], 1)  # (B, steps, L)

    toks, batch = decode_ffn(prompts)
    alone = [decode_ffn([p]) for p in prompts]
    assert toks == [t[0] for t, _ in alone]
    for b, (_, m) in enumerate(alone):
        assert torch.equal(batch[b], m[0])
    mid = batch[..., 1:-1]
    assert bool(mid.any()) and not bool(mid.all())  # decisions went both ways: the comparison could fail


def test_ffn_skip_budget_below_its_floor_is_refused_with_the_floor(eng):
    pol = registry.get("ffn-skip", 0.3)
    with pytest.raises(PonderError, match="minimum reachable budget is 0.55"):
        pol.calibrate(eng, CALIB)
    assert pol.min_budget(eng) == pytest.approx(1 - 0.6 * 6 / 8)


def test_ffn_skip_calibrated_budget_holds_on_calibration(eng):
    pol = registry.get("ffn-skip", 0.8)
    pol.calibrate(eng, CALIB)
    assert pol.calibration["calibration_fraction"] <= 0.8
    assert realized(eng, pol, CALIB).fraction <= 0.8 + 1e-3
