"""self-speculative decoding: lossless drafting by layers or by prompt lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ponder.api as api
from conftest import CALIB
from ponder.engine import SamplingConfig, Stats, generate
from ponder.errors import PonderError
from ponder.policies import registry

REF = Path(__file__).resolve().parents[2] / "models" / "ref"


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
        pol.fitted(eng, {"alphas": {i: alpha for i in range(1, 8)}})
        res = pol.generate(eng, [prompt], sc)
        assert res.extra["layer_drafting"] is drafting and res.tokens == dense
        assert ("rounds" in res.extra) is drafting
        assert (res.extra["predicted_layer_draft_speedup"] > 1) is drafting
    pol = registry.get("self-speculative", drafter="lookup+layers")
    pol.fitted(eng, {"alphas": {i: 0.05 for i in range(1, 8)}})
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
