"""early-exit, and the engine fills it relies on (kv copy, one-shot exit K/V)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ponder.api as api
from conftest import CALIB, TOL, score_stats
from ponder.engine import LayerPlan, Stats
from ponder.engine.forward import PlannerBase
from ponder.policies import registry

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


def test_engine_kv_copy_copies_the_previous_layer(eng):
    ids = torch.tensor([CALIB[0][:10]])
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 4] = False
    plans = [None, None, LayerPlan.from_masks(mask, mask, kv="copy"), LayerPlan.from_masks(mask, mask, kv="copy")] \
        + [None] * 4

    class Fixed(PlannerBase):
        def layer(self, i, x, ctx):
            return plans[i]

    cache = eng.new_cache(1, 10)
    eng.forward(ids, cache, Fixed())
    for i in (2, 3):
        assert torch.equal(cache.k[i][0, :, 4], cache.k[1][0, :, 4])
        assert torch.equal(cache.v[i][0, :, 4], cache.v[1][0, :, 4])
        assert not torch.equal(cache.k[i][0, :, 5], cache.k[1][0, :, 5])
    assert not cache.holes


@pytest.mark.parametrize("stacked", [True, False])  # False: the per-layer loop a large model uses
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # plain, K/V biases, K norm
def test_exit_kv_writes_what_per_layer_compute_writes(tiny_folder, family, stacked, monkeypatch):
    """The one-shot fill at exit (all skipped layers' K/V in one batched projection) must leave the cache exactly as
    the per-layer ``kv="compute"`` fill does, and later layers with ``kv="filled"`` must not touch those slots."""
    e = api.load(tiny_folder(family, layers=6)[0])
    if not stacked:
        monkeypatch.setattr(type(e), "EXIT_STACK_MAX_BYTES", 0)
    T = 9
    ids = torch.randint(3, e.cfg.vocab_size, (2, T))
    run = torch.ones(2, T, dtype=torch.bool)
    run[0, 3], run[1, 7], run[1, 8] = False, False, False  # these tokens leave before layer 2
    gone = (~run).reshape(-1).nonzero().squeeze(1)

    class PerLayer(PlannerBase):
        def layer(self, i, x, ctx):
            return LayerPlan.from_masks(run, run, kv="compute") if i >= 2 else None

    class AtExit(PlannerBase):
        def layer(self, i, x, ctx):
            if i == 2:
                e.exit_kv(2, gone, x.reshape(-1, x.shape[-1])[gone], ctx)
            return LayerPlan.from_masks(run, run, kv="filled") if i >= 2 else None

    caches, outs = [], []
    for planner in (PerLayer(), AtExit()):
        c = e.new_cache(2, T)
        c.set_padding(torch.tensor([0, 2]))  # left padding: positions differ from columns in row 1
        st = Stats(e.cfg)
        outs.append((e.forward(ids, c, planner, stats=st).logits, st.summary()))
        caches.append(c)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        assert (a - b).abs().max() < 1e-5
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5
    assert outs[0][1] == outs[1][1]  # the same work is counted either way
    assert (caches[1].k[2:, 0, :, 3].abs().sum(-1) > 0).all()  # the slots were written, not left at zero
    assert (getattr(e, "_exit_kv_stack", None) is not None) == stacked


@pytest.mark.parametrize("kv_fill", ["state", "kv-copy", "none"])
def test_early_exit_variants_are_cache_consistent(eng, kv_fill):
    pol = registry.get("early-exit", 0.7, kv_fill=kv_fill)
    pol.calibrate(eng, CALIB)
    ids = torch.tensor([CALIB[0][:20]])
    full = eng.forward(ids, planner=pol.planner(eng), phase="score").logits
    cache, pl = eng.new_cache(1, 20), pol.planner(eng)
    steps = [eng.forward(ids[:, t:t + 1], cache, pl, phase="decode").logits[:, 0] for t in range(20)]
    assert (torch.stack(steps, 1) - full).abs().max() < TOL


def test_early_exit_counts_the_head_and_variants_differ(eng):
    ids = torch.tensor(CALIB[:2])
    pol = registry.get("early-exit", 1.0, threshold=0.0)  # everyone leaves at the first check
    _, st = score_stats(eng, pol, ids)
    assert st.overhead_flops == pytest.approx(eng.head_flops(ids.numel()))  # one check per token, counted
    head = eng.cfg.hidden_size * eng.cfg.vocab_size * st.weight_bytes_per_param
    assert st.overhead_bytes == head  # the check read the head once
    # every token's final logits are its check's (same frozen state): the head is not run again at the end
    assert st.head_flops == 0 and st.head_bytes == 0
    assert st.dense_head_flops == pytest.approx(eng.head_flops(ids.numel())) and st.dense_head_bytes == head
    assert set(st.layers_used()[0].flatten().tolist()) == {2}  # first check at L // 4 = 2
    thr = registry.get("early-exit", 0.7)
    thr.calibrate(eng, CALIB)  # mixed exits, so later tokens read what exited tokens left behind
    outs = {fill: score_stats(eng, registry.get("early-exit", threshold=thr.calibration["threshold"],
                                                kv_fill=fill), ids)[0] for fill in ("state", "kv-copy", "none")}
    assert (outs["state"] - outs["kv-copy"]).abs().max() > 1e-3
    assert (outs["state"] - outs["none"]).abs().max() > 1e-3
    # reused check logits (leavers) and computed ones (the rest) together equal the head on the final states
    out = eng.forward(ids, planner=thr.planner(eng), phase="score")
    assert (out.logits - eng.logits(out.hidden)).abs().max() < 1e-5
    last = eng.forward(ids, planner=thr.planner(eng), phase="score", logits="last")
    assert (last.logits - eng.logits(last.hidden[:, -1])).abs().max() < 1e-5


def test_early_exit_saturation_measure_is_cheap_and_consistent(eng):
    pol = registry.get("early-exit", 0.6, measure="saturation")
    pol.calibrate(eng, CALIB)
    assert pol.calibration["calibration_fraction"] <= 0.6
    ids = torch.tensor([CALIB[1][:16]])
    full, st = score_stats(eng, pol, ids)
    assert 0 < st.overhead_flops < 0.1 * eng.head_flops(ids.numel())  # O(d) checks, far below head calls
    cache, pl = eng.new_cache(1, 16), pol.planner(eng)
    steps = [eng.forward(ids[:, t:t + 1], cache, pl, phase="decode").logits[:, 0] for t in range(16)]
    assert (torch.stack(steps, 1) - full).abs().max() < TOL


def test_early_exit_logits_come_from_the_frozen_exit_state(eng):
    from ponder.engine.states import _Tap

    ids = torch.tensor([CALIB[0][:1]])  # one token: nothing before it, so exit state = dense state at that depth
    pol = registry.get("early-exit", 1.0, threshold=0.0)
    out = eng.forward(ids, planner=pol.planner(eng)).logits
    tap = _Tap()
    eng.forward(ids, planner=tap)
    assert (out - eng.logits(tap.outs[1])).abs().max() < TOL
