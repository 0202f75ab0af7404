"""Mixed-precision KV (mikv): demoted slots dequantise within the stated tolerance, attention over them equals
attention over a dense cache holding their dequantised values, the bytes held are the budget's, bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import tol
from ponder.engine.cache import KVCache
from ponder.engine.lowbits import bytes_per_value, dequantise, quantise
from ponder.errors import PonderError
from ponder.policies import kv

G = torch.Generator().manual_seed(11)
LONG = torch.randint(3, 97, (60,), generator=G).tolist()


@pytest.fixture(params=["float32", "q4_1"])
def eng(request, eng):
    return eng if request.param == "float32" else request.getfixturevalue("qeng")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantised_slots_dequantise_within_tolerance(bits):
    t = torch.randn(2, 3, 40, 64, generator=G) * 3
    t[..., 7] += 25  # an outlier channel, as rotated keys have
    t[0, 0, 0] = 1.5  # a constant group: exact
    p = quantise(t, bits, 32)
    d = dequantise(p, torch.float32)
    groups = t.view(2, 3, 40, 2, 32)
    step = p.scale.float()
    lim = (step / 2 + 2 ** -11 * groups.abs().amax(-1)).repeat_interleave(32, -1)
    assert ((d - t).abs() <= lim * (1 + 1e-6) + 1e-7).all()
    assert torch.equal(d[0, 0, 0], t[0, 0, 0])
    assert step.max() <= (groups.amax(-1) - groups.amin(-1)).max() / ((1 << bits) - 1) * 1.001  # the range used
    assert p.nbytes() == t.numel() * bytes_per_value(bits, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantise(t, 3, 32)


def test_attention_over_demoted_slots_equals_a_dense_cache_of_their_values(eng):
    """The engine's route over packed slots is attention over their dequantised values: put those values into a
    plain cache at the demoted columns, mask nothing, and the continuation's logits agree."""
    pol = kv.get("mikv", 0.5)
    cont = torch.randint(3, 97, (1, 8), generator=G)
    c = eng.new_cache(1, len(LONG) + 8, shrinking=True)
    first = eng.forward(torch.tensor([LONG]), c, pol.planner(eng), logits="last").logits
    assert c.low and c.length == pol.planner(eng).kept(len(LONG))
    m = c.low[0].k.q.shape[2]
    assert m + c.length == len(LONG)  # every token is somewhere: kept, or demoted
    steps = torch.cat([eng.forward(cont[:, t:t + 1], c, None, logits="last", phase="decode").logits[:, None]
                       for t in range(8)], 1)

    ref = KVCache(eng.cfg, 1, len(LONG) + 8, eng.dtype, eng.device)
    ref.reserve(len(LONG))
    c2 = eng.new_cache(1, len(LONG) + 8, shrinking=True)
    eng.forward(torch.tensor([LONG]), c2, pol.planner(eng), logits="last")
    for i in range(eng.cfg.num_hidden_layers):  # demoted slots first (dequantised), then the kept ones
        lk, lv = c2.low[i].values(eng.dtype)
        ref.k[i][:, :, :m], ref.v[i][:, :, :m] = lk, lv
        ref.k[i][:, :, m:len(LONG)] = c2.k[i][:, :, :c2.length]
        ref.v[i][:, :, m:len(LONG)] = c2.v[i][:, :, :c2.length]
    ref.length = len(LONG)
    # the reference's positions must continue as the cut cache's do: the same rotary angles for the new tokens
    assert c2.positions(c2.length, c2.length + 1).item() == len(LONG) == ref.positions(m + c2.length,
                                                                                         m + c2.length + 1).item()
    once = eng.forward(cont, ref, None, logits="all", phase="decode").logits
    assert (steps - once).abs().max() < tol(eng)
    assert not torch.equal(first, first * 0)


def test_mixed_precision_holds_the_budget_of_bytes_and_quality_beyond_eviction(eng):
    dense_slot = 2 * eng.cfg.num_key_value_heads * eng.cfg.head_dim * eng.dtype.itemsize
    L, n = eng.cfg.num_hidden_layers, len(LONG)
    for budget in (0.5, 0.3):
        pol = kv.get("mikv", budget)
        c = eng.new_cache(1, n, shrinking=True)
        eng.forward(torch.tensor([LONG]), c, pol.planner(eng), logits="last")
        held = c.nbytes() / (L * n * dense_slot)
        assert budget - 1e-9 <= held <= budget + 1 / n, (budget, held)  # one token of rounding up
        assert all(c.k[i].untyped_storage().nbytes() == c.length * dense_slot // 2 for i in range(L))
    # with 8 bits, the continuation stays nearer dense than the same ranking evicting at the same bytes
    from ponder.eval.longctx import continuation_nll, prefill_all

    ctx, cont = LONG[:48], LONG[48:]
    last, caches = prefill_all(eng, ctx, {"m": kv.get("mikv:bits=8", 0.5), "s": kv.get("snapkv:window=4", 0.5)},
                               len(cont))
    d, m, s = (continuation_nll(eng, last, caches[k], cont) for k in ("dense", "m", "s"))
    assert abs(m - d) < abs(s - d)


def test_mikv_bad_input_one_clear_line(eng):
    with pytest.raises(PonderError, match="one of \\(2, 4, 8\\) bits"):
        kv.get("mikv", 0.5, bits=3)
    with pytest.raises(PonderError, match="ranks tokens by one of"):
        kv.get("mikv", 0.5, by="knorm")
    with pytest.raises(PonderError, match="below that: raise the budget or lower bits"):
        kv.get("mikv", 0.1).planner(eng)  # 4 bits on a 16-value head: every token costs 18.75% at least
    with pytest.raises(PonderError, match="must divide the model's head size"):
        kv.get("mikv", 0.5, group=12).planner(eng)
    with pytest.raises(PonderError, match="whole number of bytes"):
        kv.get("mikv", 0.5, bits=2, group=6)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (2, 16)])
def test_packed_kernels_equal_attention_over_dequantised_values(bits, group):
    """engine/packed.cpp reads the packed slots in place (AVX-512 at 4 bits where the CPU has it, plain loops
    otherwise, both forced here) and must give the products over the dequantised values."""
    from ponder.engine import fused

    mod = fused.load()
    if mod is None:
        pytest.skip("the compiled steps are not available here")
    N, m, R, hd = 3, 300, 5, 64
    kq, vq = quantise(torch.randn(N, m, hd, generator=G), bits, group), quantise(torch.randn(N, m, hd), bits, group)
    q, p = torch.randn(N, R, hd, generator=G), torch.rand(N, R, m, generator=G)
    ref_s = torch.bmm(q, dequantise(kq, torch.float32).transpose(1, 2))
    ref_o = torch.bmm(p, dequantise(vq, torch.float32))
    for fast in (True, False):
        s = mod.packed_qk(q, kq.q, kq.scale, kq.zero, bits, group, fast)
        o = mod.packed_pv(p, vq.q, vq.scale, vq.zero, bits, group, fast)
        assert (s - ref_s).abs().max() < 1e-4 and (o - ref_o).abs().max() < 1e-3, fast
