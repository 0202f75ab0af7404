"""The training-free depth policies, each against what its method promises (the matrix checks the shared flags)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ponder.api as api
from ponder.engine import LayerPlan, SamplingConfig, Stats, generate
from ponder.engine.forward import PlannerBase
from ponder.engine.stats import ATTN, FFN
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.budget import fit_threshold, realized
from ponder.policies.skipdecode import schedule
from ponder.policies.unified_skip import spread

REF = Path(__file__).resolve().parents[1] / "models" / "ref"
G = torch.Generator().manual_seed(21)
CALIB = torch.randint(3, 97, (6, 40), generator=G).tolist()
TOL = 1e-4


@pytest.fixture(scope="module")
def eng(tiny_folder):
    return api.load(tiny_folder("llama", layers=8)[0])


def score_stats(eng, pol, ids):
    st = Stats(eng.cfg)
    out = eng.forward(ids, planner=pol.planner(eng), stats=st, phase="score").logits
    return out, st


# ---- budget controller --------------------------------------------------------------------------------------------
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


# ---- unified-skip -------------------------------------------------------------------------------------------------
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


# ---- ffn-skip -----------------------------------------------------------------------------------------------------
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


# ---- skipdecode ---------------------------------------------------------------------------------------------------
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


# ---- early-exit ---------------------------------------------------------------------------------------------------
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


# ---- oracle -------------------------------------------------------------------------------------------------------
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


# ---- self-speculative ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exit_layer,draft_len,adaptive,drafter", [
    (1, 1, False, "layers"), (3, 4, True, "layers"), (6, 8, True, "layers"), (7, 2, False, "layers"),
    (4, 3, True, "lookup"), (2, 5, False, "lookup"), (4, 3, True, "lookup+layers")])
def test_self_speculative_greedy_equals_dense(eng, exit_layer, draft_len, adaptive, drafter):
    pol = registry.get("self-speculative", exit_layer=exit_layer, draft_len=draft_len, adaptive=adaptive,
                       drafter=drafter)
    rep = CALIB[5][:5] * 3  # repetitive prompts give the lookup drafter matches
    prompts = [CALIB[0][:6] + rep, CALIB[1][:3], rep + CALIB[2][:9]]
    sc = SamplingConfig(max_new_tokens=20, stop_tokens=(CALIB[3][0],))
    dense = generate(eng, prompts, sc)
    st, st_dense = Stats(eng.cfg), Stats(eng.cfg)
    res = pol.generate(eng, prompts[:1], sc, st)
    generate(eng, prompts[:1], sc, stats=st_dense)
    assert res.tokens[0] == dense.tokens[0] and res.finish[0] == dense.finish[0]
    assert pol.generate(eng, prompts, sc).tokens == dense.tokens
    assert res.extra["exit_layer"] == exit_layer and 0 <= (res.extra["acceptance_rate"] or 0) <= 1
    assert (res.extra["lookup_rounds"] > 0) == ("lookup" in drafter)
    # the dense side of the accounting is exactly what dense generation would have spent on the same tokens
    assert st.tokens == st_dense.tokens and st.dense_flops == pytest.approx(st_dense.dense_flops)
    assert st.flops_fraction >= 1.0 - 1e-9  # drafts that were thrown away are counted


def test_lookup_drafts_continue_the_latest_match():
    from ponder.engine.speculative import lookup

    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(seq, 2, 3, 2) == [7, 8]  # "2 3" last seen before at index 6 (longest suffix "5 2 3": absent)
    assert lookup(seq, 9, 3, 2) == [7, 8, 5, 2, 3]
    assert lookup([1, 2, 3, 4], 3, 3, 2) == []
    assert lookup([4, 4, 4], 1, 3, 1) == [4]


def test_self_speculative_accepts_everything_when_the_draft_is_the_model(eng):
    """Drafting with L-1 layers of a model whose last layer is disabled: every draft must be accepted."""
    import copy

    e2 = copy.copy(eng)
    last = copy.copy(eng.layers[-1])
    last.wo = torch.zeros_like(last.wo)
    last.wd = torch.zeros_like(last.wd)
    e2.layers = eng.layers[:-1] + [last]
    pol = registry.get("self-speculative", exit_layer=7, draft_len=4, adaptive=False)
    res = pol.generate(e2, [CALIB[0][:5]], SamplingConfig(max_new_tokens=21))
    assert res.extra["acceptance_rate"] == 1.0 and res.extra["rounds"] == 4
    assert res.tokens == generate(e2, [CALIB[0][:5]], SamplingConfig(max_new_tokens=21)).tokens


def test_speculative_rejection_sampling_draws_from_the_target():
    """One round's output token, over 40000 independent rows, follows p whatever q proposed."""
    from ponder.engine.speculative import sampled_round

    g = torch.Generator().manual_seed(3)
    V, B = 6, 40000
    p0 = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1, 0.0])
    q0 = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.0, 0.2])
    p = torch.stack([p0, torch.full((V,), 1 / V)]).expand(B, 2, V)
    q = q0.expand(B, 1, V)
    drafts = torch.multinomial(q0, B, replacement=True, generator=g)[:, None]
    rows = [sampled_round(p[i:i + 1], q[i:i + 1], drafts[i:i + 1], torch.ones(1, dtype=torch.bool), g)
            for i in range(0, 4000)]
    a_s = torch.tensor([r[0] for r in rows])
    first = torch.tensor([int(drafts[i, 0]) if a_s[i] == 1 else int(rows[i][1][0]) for i in range(4000)])
    freq = torch.bincount(first, minlength=V).float() / 4000
    assert (freq - p0).abs().max() < 0.03
    assert float(a_s.float().mean()) == pytest.approx(float(torch.minimum(p0, q0).sum()), abs=0.03)  # accept rate
    a, nxt = sampled_round(p, q, drafts, torch.ones(B, dtype=torch.bool), g)  # a batch keeps its minimum ...
    assert a == 0
    assert (torch.bincount(nxt, minlength=V).float() / B - p0).abs().max() < 0.01  # ... and rows still follow p


def test_self_speculative_sampling_end_to_end(eng):
    """Joint law of the first two sampled tokens (top-k 3): exact dense vs 200 seeded speculative runs."""
    from ponder.engine.generate import distribution

    prompt = CALIB[4][:5]
    sc = dict(temperature=1.0, top_k=3)
    p1 = distribution(eng.forward(torch.tensor([prompt])).logits[:, -1], SamplingConfig(**sc))[0]
    exact = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = distribution(eng.forward(torch.tensor([prompt + [t1]])).logits[:, -1], SamplingConfig(**sc))[0]
        for t2 in p2.nonzero().flatten().tolist():
            exact[(t1, t2)] = float(p1[t1] * p2[t2])
    pol = registry.get("self-speculative", exit_layer=2, draft_len=2, adaptive=False)
    n = 200
    counts: dict = {}
    for seed in range(n):
        toks = pol.generate(eng, [prompt], SamplingConfig(max_new_tokens=3, seed=seed, **sc)).tokens[0]
        counts[tuple(toks[:2])] = counts.get(tuple(toks[:2]), 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - v) for k, v in exact.items())
    assert tv < 0.15, (tv, counts, exact)


def test_self_speculative_auto_mode_drafts_only_when_the_cost_model_expects_a_gain(eng):
    prompt, sc = CALIB[0][:6], SamplingConfig(max_new_tokens=12)
    dense = generate(eng, [prompt], sc).tokens
    for alpha, drafting in ((0.05, False), (0.99, True)):
        pol = registry.get("self-speculative")
        pol.calibration = {"alphas": {i: alpha for i in range(1, 8)}, "engine": id(eng)}
        res = pol.generate(eng, [prompt], sc)
        assert res.extra["layer_drafting"] is drafting and res.tokens == dense
        assert ("rounds" in res.extra) is drafting
        assert (res.extra["predicted_layer_draft_speedup"] > 1) is drafting
    pol = registry.get("self-speculative", drafter="lookup+layers")
    pol.calibration = {"alphas": {i: 0.05 for i in range(1, 8)}, "engine": id(eng)}
    res = pol.generate(eng, [CALIB[1][:4] * 4], sc)  # layers not worth it: lookup drafts only
    assert res.extra["lookup_rounds"] > 0 and res.extra["layer_rounds"] == 0
    assert res.tokens == generate(eng, [CALIB[1][:4] * 4], sc).tokens


def test_self_speculative_lookup_has_no_budget():
    with pytest.raises(PonderError, match="no budget to set"):
        registry.get("self-speculative", 0.75, drafter="lookup")
    assert registry.get("self-speculative", 0.75, drafter="lookup+layers").drafter == "lookup+layers"


def test_self_speculative_scoring_is_dense(eng):
    pol = registry.get("self-speculative", 0.5)
    assert pol.planner(eng) is None and pol.lossless


@pytest.mark.skipif(not (REF / "config.json").is_file(), reason="the shipped model (models/ref) is not there yet")
def test_self_speculative_is_lossless_on_the_shipped_model():
    ref = api.load("ref")
    prompts = [ref.tokenizer.encode(t) for t in ("def add(a, b):\n    return", "The history of the", "import os\n")]
    sc = SamplingConfig(max_new_tokens=24)
    for E in (3, 6, 9):
        pol = registry.get("self-speculative", exit_layer=E)
        for p in prompts:
            assert pol.generate(ref, [p], sc).tokens == generate(ref, [p], sc).tokens
