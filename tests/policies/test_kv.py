"""KV-selection policies and the shrinking cache, on the tiny random 8-layer model (both weight forms).

Every policy goes through one list of claims (as kvpress runs every press through one test list): keeping every
token is dense bit for bit, a batch equals its rows alone, cached decoding after the cut equals teacher-forced
scoring after the same cut, evicted slots are really gone, positions continue. Then each method's own rule.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tol
from ponder.engine import SamplingConfig, generate
from ponder.engine.forward import PlannerBase
from ponder.errors import PonderError
from ponder.policies import kv
from ponder.policies import registry as depth

NAMES = kv.names()
CUTTERS = [n for n in NAMES if "memory" in kv.registry._REGISTRY[n].saves]  # policies that cut the cache
# those that keep the budget's share of every head and nothing else (mikv keeps the rest at low precision, razor
# whole for a few heads: their own tests, test_mikv.py and test_razor.py)
EVICTERS = [n for n in CUTTERS if n not in ("mikv", "razor")]
G = torch.Generator().manual_seed(3)
LONG = torch.randint(3, 97, (60,), generator=G).tolist()
PROMPTS = [LONG, LONG[5:30], LONG[:47]]
SC = SamplingConfig(max_new_tokens=8)


@pytest.fixture(params=["float32", "q4_1"])
def eng(request, eng):
    return eng if request.param == "float32" else request.getfixturevalue("qeng")


class KeepAll(PlannerBase):
    """Cuts every layer but keeps every real slot: the whole shrinking machinery, nothing evicted."""

    def evict(self, i, x_in, ctx):
        if ctx.phase != "prefill":
            return None
        B, T, Hk = ctx.B, ctx.end, ctx.engine.cfg.num_key_value_heads
        idx = torch.arange(T).expand(B, Hk, T).contiguous()
        return idx, ctx.end - ctx.cache.pad


def test_names():
    assert set(NAMES) >= {"streaming", "snapkv", "tova", "h2o", "knorm", "kv-random", "lazyllm"}
    assert set(NAMES) - set(CUTTERS) == {"lazyllm", "tokenselect"}
    assert not set(NAMES) & set(depth.names()), "KV policies have their own registry"


def test_keeping_every_slot_equals_dense_bit_for_bit(eng):
    d = generate(eng, PROMPTS, SC)
    got = generate(eng, PROMPTS, SC, planner_factory=KeepAll, shrinking=True)
    assert got.tokens == d.tokens
    # logits too, exactly: prefill through the cut, then teacher-forced continuation
    cont = torch.tensor([LONG[:9]])
    outs = []
    for shrinking, planner in ((False, None), (True, KeepAll())):
        c = eng.new_cache(1, len(LONG) + 9, shrinking)
        first = eng.forward(torch.tensor([LONG]), c, planner, logits="last").logits
        outs.append((first, eng.forward(cont, c, planner, logits="all", phase="decode").logits))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", NAMES)
def test_budget_one_and_a_large_token_budget_equal_dense(eng, name):
    d = generate(eng, PROMPTS, SC).tokens
    assert kv.get(name, 1.0).generate(eng, PROMPTS, SC).tokens == d
    if name in CUTTERS:
        assert kv.get(name, 1.0, tokens=len(LONG)).generate(eng, PROMPTS, SC).tokens == d


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_rows_alone(eng, name, budget):
    pol = kv.get(name, budget, **({"window": 4} if name == "snapkv" else {}))
    assert pol.generate(eng, PROMPTS, SC).tokens == [pol.generate(eng, [p], SC).tokens[0] for p in PROMPTS]


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_recomputation_after_the_cut(eng, name):
    if not kv.registry._REGISTRY[name].kv_compatible:
        pytest.skip(f"{name} does not claim KV compatibility")
    pol = kv.get(name, 0.5)
    cont = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(5))

    def cut():
        c = eng.new_cache(1, len(LONG) + 10, shrinking=pol.shrinks)
        pl = pol.planner(eng)
        first = eng.forward(torch.tensor([LONG]), c, pl, logits="last").logits
        return c, pl, first

    c, pl, first = cut()
    assert c.length == (pl.kept(len(LONG)) if name in CUTTERS else len(LONG))
    assert c.length == 30 or name not in EVICTERS
    steps = [eng.forward(cont[:, t:t + 1], c, pl, logits="last", phase="decode").logits for t in range(10)]
    c2, pl2, first2 = cut()
    once = eng.forward(cont, c2, pl2, logits="all", phase="decode").logits
    assert torch.equal(first, first2)
    assert (torch.stack(steps, 1) - once).abs().max() < tol(eng)


@pytest.mark.parametrize("name", EVICTERS)
def test_evicted_slots_are_gone_and_positions_continue(eng, name):
    pol = kv.get(name, 0.25)
    c = eng.new_cache(2, 47 + 8, shrinking=True)
    c.set_padding(torch.tensor([0, 22]))
    ids = torch.tensor([LONG[:47], [0] * 22 + LONG[5:30]])
    eng.forward(ids, c, pol.planner(eng), logits="last")
    n, room = 12, 8  # ceil(0.25 * 47) slots for the longer row; the shorter keeps ceil(0.25 * 25) = 7
    assert c.length == n and c.max_len == n + room
    assert c.pad.tolist() == [0, n - 7]
    per_slot = 2 * eng.cfg.num_key_value_heads * eng.cfg.head_dim * torch.empty(0, dtype=eng.dtype).element_size()
    L = eng.cfg.num_hidden_layers
    assert c.nbytes() == L * 2 * (n + room) * per_slot  # the full-length tensors were released
    assert all(c.k[i].untyped_storage().nbytes() == 2 * (n + room) * per_slot // 2 for i in range(L))
    assert c.positions(n, n + 1).tolist() == [[47], [25]]  # next tokens continue the rows' own counts
    assert c.valid[1, :n].tolist() == [False] * 5 + [True] * 7


def test_streaming_keeps_sinks_and_window(eng):
    class Spy(PlannerBase):
        def __init__(self):
            self.inner = kv.get("streaming", 1.0, tokens=10, sinks=3).planner(eng)
            self.kept = []

        def evict(self, i, x_in, ctx):
            out = self.inner.evict(i, x_in, ctx)
            if out is not None:
                self.kept.append(out[0])
            return out

    sp = Spy()
    c = eng.new_cache(1, 60, shrinking=True)
    eng.forward(torch.tensor([LONG[:40]]), c, sp, logits="last")
    want = [0, 1, 2] + list(range(33, 40))
    assert all(k[0, h].tolist() == want for k in sp.kept for h in range(k.shape[1]))


def test_snapkv_keeps_its_window_and_tova_the_last_token(eng):
    for name, must in (("snapkv", set(range(30, 40))), ("tova", {39})):
        pol = kv.get(name, 1.0, tokens=15, **({"window": 10} if name == "snapkv" else {}))
        pl = pol.planner(eng)
        seen = []
        orig = pl.evict

        def spy(i, x_in, ctx, orig=orig, seen=seen):
            out = orig(i, x_in, ctx)
            seen.append(out[0])
            return out

        pl.evict = spy
        eng.forward(torch.tensor([LONG[:40]]), eng.new_cache(1, 50, True), pl, logits="last")
        for k in seen:
            assert all(must <= set(k[0, h].tolist()) for h in range(k.shape[1])), name
        if name == "tova":  # one ranking shared by the layer's KV heads
            assert all(torch.equal(k[0, 0], k[0, h]) for k in seen for h in range(k.shape[1]))


def test_window_attention_is_a_distribution_over_real_keys(eng):
    from ponder.policies.kv.base import window_attention

    seen = {}

    class Probe(PlannerBase):
        def evict(self, i, x_in, ctx):
            if i == 1:
                seen["p"] = window_attention(eng, i, x_in, ctx, ctx.end, chunk=7)
                seen["p1"] = window_attention(eng, i, x_in, ctx, 5)
            return None

    c = eng.new_cache(2, 40, True)
    c.set_padding(torch.tensor([0, 9]))
    eng.forward(torch.tensor([LONG[:40], [0] * 9 + LONG[:31]]), c, Probe(), logits="last")
    for p in (seen["p"], seen["p1"]):
        assert torch.allclose(p.sum(-1), torch.ones(2, eng.cfg.num_key_value_heads), atol=1e-5)
        assert float(p[1, :, :9].abs().max()) == 0.0  # padding receives nothing


def test_bad_input_one_clear_line():
    with pytest.raises(PonderError, match="in \\(0, 1\\]"):
        kv.get("snapkv", 1.5)
    with pytest.raises(PonderError, match="needs at least 5"):
        kv.get("streaming", 1.0, tokens=3)
    with pytest.raises(PonderError, match="observation window of 32"):
        kv.get("snapkv", 1.0, tokens=20)
    with pytest.raises(PonderError, match="unknown KV policy"):
        kv.get("nope")
    with pytest.raises(PonderError, match="no parameter"):
        kv.get("tova", 0.5, window=3)


def test_a_depth_policy_that_leaves_holes_is_refused(eng):
    class Holes(PlannerBase):
        def layer(self, i, x, ctx):
            from ponder.engine.plan import LayerPlan
            return LayerPlan.skip(kv="none") if i == 1 else None

    with pytest.raises(PonderError, match="cannot be combined"):
        eng.forward(torch.tensor([LONG[:20]]), eng.new_cache(1, 30, True), Holes(), logits="last")


def test_fan_out_cuts_equal_each_policy_run_alone(eng):
    """The long-context bench takes every policy's cut from one dense prefill; each must equal its own run."""
    from ponder.eval.longctx import continuation_nll, prefill_all

    pols = {n: kv.get(n, 0.4) for n in CUTTERS}
    cont = LONG[40:52]
    last, caches = prefill_all(eng, LONG[:40], pols, len(cont))
    for n, pol in pols.items():
        c = eng.new_cache(1, 40 + len(cont), shrinking=True)
        alone_last = eng.forward(torch.tensor([LONG[:40]]), c, pol.planner(eng), logits="last").logits[0]
        assert torch.equal(alone_last, last)
        assert c.length == caches[n].length == pol.planner(eng).kept(40)
        assert c.length == 16 or n not in EVICTERS
        for i in range(eng.cfg.num_hidden_layers):
            assert torch.equal(c.k[i][:, :, :c.length], caches[n].k[i][:, :, :c.length]), (n, i)
            if i in c.low:
                assert torch.equal(c.low[i].k.q, caches[n].low[i].k.q), (n, i)
        assert continuation_nll(eng, last, c, cont) == continuation_nll(eng, last, caches[n], cont)
    d = eng.new_cache(1, 52)
    eng.forward(torch.tensor([LONG[:40]]), d, logits="last")
    assert continuation_nll(eng, last, d, cont) == pytest.approx(continuation_nll(eng, last, caches["dense"], cont),
                                                                 abs=1e-4)


def test_lazyllm_prunes_prefill_rows_in_stages_and_keeps_the_cache_whole(eng):
    pol = kv.get("lazyllm", 0.25)
    L = eng.cfg.num_hidden_layers
    assert pol.stage_layers(L) == [2, 4, 6]
    seen = {}

    class Spy:
        def __init__(self):
            self.inner = pol.planner(eng)

        def layer(self, i, x, ctx):
            p = self.inner.layer(i, x, ctx)
            seen[i] = None if p is None else p.attn.numel()
            return p

        def observe(self, i, x, ctx):
            return None

        def known_logits(self):
            return None

        def evict(self, i, x_in, ctx):
            return None

    c = eng.new_cache(1, 70)
    stats = eng.new_stats()
    out = eng.forward(torch.tensor([LONG]), c, Spy(), stats, logits="last").logits
    assert [seen[i] for i in range(L)] == [None, None, 38, 38, 24, 24, 15, 15]  # ceil(60 * 0.25 ** (j / 3))
    assert stats.flops_fraction < 0.75
    assert c.length == 60 and sorted(c.holes) == list(range(2, L))  # pruned tokens leave no K/V there
    assert int((~c.holes[7][0, :60]).sum()) == 60 - 15
    dense = eng.forward(torch.tensor([LONG]), eng.new_cache(1, 70), logits="last").logits
    assert (out - dense).abs().max() > 0  # pruning changed the states (the test can fail)
    with pytest.raises(PonderError, match="no token budget"):
        kv.get("lazyllm", 0.5, tokens=10)
    c2 = eng.new_cache(1, 70)
    eng.forward(torch.tensor([LONG]), c2, kv.get("lazyllm", 0.25, kv="compute").planner(eng), logits="last")
    assert not c2.holes  # "compute": every token left K/V in every layer


def test_selective_attention_over_every_key_equals_dense_and_tokenselect_reads_its_share(eng):
    from ponder.engine.plan import LayerPlan

    Hk = eng.cfg.num_key_value_heads

    class Every(PlannerBase):
        def layer(self, i, x, ctx):
            if ctx.T != 1:
                return None
            keys = torch.arange(ctx.start).expand(ctx.B, Hk, ctx.start).contiguous()
            return LayerPlan(keys=keys, keys_ok=torch.ones_like(keys, dtype=torch.bool))

    for planner, same in ((Every(), True), (kv.get("tokenselect", 0.25).planner(eng), False)):
        outs = []
        for pl in (None, planner):
            c = eng.new_cache(1, 70)
            eng.forward(torch.tensor([LONG[:50]]), c, pl, logits="last")
            outs.append(torch.stack([eng.forward(torch.tensor([[t]]), c, pl, logits="last", phase="decode").logits
                                     for t in LONG[50:58]]))
        diff = float((outs[0] - outs[1]).abs().max())
        assert (diff < tol(eng)) == same, diff
    seen = []
    pl = kv.get("tokenselect", 0.25).planner(eng)
    c = eng.new_cache(2, 70)
    c.set_padding(torch.tensor([0, 30]))
    eng.forward(torch.tensor([LONG[:50], [0] * 30 + LONG[:20]]), c, None, logits="last")

    class Ctx:
        T, B, start, cache = 1, 2, 50, c
        positions = torch.tensor([[50], [20]])

    plan = pl.layer(1, torch.randn(2, 1, eng.cfg.hidden_size, dtype=eng.dtype), Ctx)
    seen = plan.keys_ok.sum(-1)
    assert seen.tolist() == [[13] * Hk, [5] * Hk]  # ceil(0.25 * real tokens) per row and KV head
    assert bool((plan.keys[1][plan.keys_ok[1]] >= 30).all())  # never a padding column


def test_lazyllm_compacted_layers_equal_the_masked_path(eng, monkeypatch):
    """A one-row prefill runs a pruned layer as a dense causal layer on the running rows (the fused kernel); the
    masked path it replaces must give the same logits, cache and holes."""
    from ponder.engine.forward import Engine

    pol = kv.get("lazyllm", 0.25)
    outs = []
    for compact in (True, False):
        if not compact:
            monkeypatch.setattr(Engine, "_compactable", staticmethod(lambda *a: False))
        c = eng.new_cache(1, 70)
        first = eng.forward(torch.tensor([LONG]), c, pol.planner(eng), logits="last").logits
        nxt = eng.forward(torch.tensor([LONG[:6]]), c, None, logits="all", phase="decode").logits
        outs.append((first, nxt, c))
    (f1, n1, c1), (f2, n2, c2) = outs
    assert (f1 - f2).abs().max() < tol(eng) and (n1 - n2).abs().max() < tol(eng)
    assert sorted(c1.holes) == sorted(c2.holes)
    assert all(torch.equal(c1.holes[i], c2.holes[i]) for i in c1.holes)
