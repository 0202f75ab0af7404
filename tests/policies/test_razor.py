"""Head budgets (razor): calibration ranks KV heads, the wide heads keep every token untouched, the others keep
sinks and a window; with every head wide the cut model is dense; bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import tol
from ponder.errors import PonderError
from ponder.policies import kv
from ponder.policies.kv.razor import retrieval_scores

G = torch.Generator().manual_seed(17)
LONG = torch.randint(3, 97, (60,), generator=G).tolist()


@pytest.fixture(params=["float32", "q4_1"])
def eng(request, eng):
    return eng if request.param == "float32" else request.getfixturevalue("qeng")


def test_calibration_ranks_every_kv_head_once_per_engine(eng):
    s = retrieval_scores(eng)
    L, Hk = eng.cfg.num_hidden_layers, eng.cfg.num_key_value_heads
    assert s.shape == (L, Hk) and (s >= 0).all() and (s <= 2).all()
    assert retrieval_scores(eng) is s  # cached
    wide = kv.get("razor", 0.5).wide_heads(eng)
    assert sum(w.numel() for w in wide) == round(0.15 * L * Hk)
    top = s.flatten().topk(round(0.15 * L * Hk)).indices.tolist()
    assert sorted(i * Hk + int(h) for i, w in enumerate(wide) for h in w) == sorted(top)


def test_wide_heads_keep_every_token_the_others_a_window(eng):
    pol = kv.get("razor", 0.5)
    pl = pol.planner(eng)
    n = pl.kept(len(LONG))
    c, d = eng.new_cache(1, len(LONG) + 4, shrinking=True), eng.new_cache(1, len(LONG) + 4)
    eng.forward(torch.tensor([LONG]), c, pl, logits="last")
    eng.forward(torch.tensor([LONG]), d, logits="last")
    assert c.length == n < len(LONG) and c.wide
    T = len(LONG)
    for i in range(eng.cfg.num_hidden_layers):
        kept = list(range(4)) + list(range(T - (n - 4), T))  # sinks, then the most recent
        assert torch.equal(c.k[i][:, :, :n], d.k[i][:, :, kept])
        if i in c.wide:
            w = c.wide[i]
            assert torch.equal(w.k[:, :, :T], d.k[i][:, w.heads, :T]) and torch.equal(w.v[:, :, :T],
                                                                                       d.v[i][:, w.heads, :T])
    held = c.nbytes()
    slot = 2 * eng.cfg.head_dim * eng.dtype.itemsize
    assert held == sum(eng.cfg.num_key_value_heads * (n + 4) * slot for _ in range(eng.cfg.num_hidden_layers)) + \
        sum(w.heads.numel() * (T + 4) * slot for w in c.wide.values())


def test_with_every_head_wide_the_cut_model_is_dense(eng, monkeypatch):
    """Each head then reads every token through the wide route: the model must be the dense one."""
    Hk = eng.cfg.num_key_value_heads
    monkeypatch.setattr(kv.registry._REGISTRY["razor"], "wide_heads",
                        lambda self, e: [torch.arange(Hk) for _ in range(e.cfg.num_hidden_layers)])
    pl = kv.get("razor", 0.5, tokens=8).planner(eng)
    cont = torch.randint(3, 97, (1, 6), generator=G)
    outs = []
    for planner in (pl, None):
        c = eng.new_cache(1, len(LONG) + 6, shrinking=planner is not None)
        first = eng.forward(torch.tensor([LONG]), c, planner, logits="last").logits
        steps = [eng.forward(cont[:, t:t + 1], c, None, logits="last", phase="decode").logits for t in range(6)]
        outs.append((first, torch.stack(steps, 1), c.length))
    assert outs[0][2] == 8 + 6 and outs[1][2] == len(LONG) + 6  # the cut happened; every head read everything
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max() < tol(eng)


def test_razor_bad_input_one_clear_line(eng):
    with pytest.raises(PonderError, match="share of KV heads kept whole"):
        kv.get("razor", 0.5, heads=1.0)
    with pytest.raises(PonderError, match="raise the budget or lower heads"):
        kv.get("razor", 0.1).planner(eng)
