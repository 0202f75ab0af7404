"""random: layers skipped per token by a hash of (position, layer, seed), K/V still computed."""

from __future__ import annotations

import pytest
import torch

import ponder.api as api
from conftest import TOL
from ponder.engine import Stats
from ponder.policies import registry
from ponder.policies.random_skip import RandomSkip, uniform_hash, uniform_hash_int


def test_random_hash_is_uniform_and_deterministic():
    pos = torch.arange(20000)
    u = uniform_hash(pos, 3, 0)
    assert torch.equal(u, uniform_hash(pos, 3, 0)) and not torch.equal(u, uniform_hash(pos, 4, 0))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float((u < 0.3).double().mean()) - 0.3) < 0.01


def test_random_hash_in_integers_is_the_same_draw():
    """Small steps draw in Python, large ones with tensors: the two must agree bit for bit, or decoding would skip
    other layers than recomputation."""
    pos = torch.cat([torch.arange(3000), torch.tensor([2**20 + 7, 2**31 - 1])])
    for layer, seed in ((1, 0), (5, 0), (3, 7), (11, 123456)):
        u = uniform_hash(pos, layer, seed).tolist()
        assert u == [uniform_hash_int(q, layer, seed) for q in pos.tolist()]


@pytest.mark.parametrize("budget", [0.8, 0.6])
def test_random_reaches_its_budget_and_keeps_first_and_last_layer(tiny_folder, budget):
    eng = api.load(tiny_folder("llama", layers=8)[0])
    pol = registry.get("random", budget)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 97, (120,), generator=gen).tolist() for _ in range(2)]
    pol.calibrate(eng, calib)
    st = Stats(eng.cfg)
    ids = torch.randint(3, 97, (4, 120), generator=gen)
    eng.forward(ids, None, pol.planner(eng), st)
    assert abs(st.flops_fraction - budget) < 0.04
    used = st.layers_used()[0]
    assert int(used.max()) <= 8 and int(used.min()) >= 2  # first and last layer always run
    m = st.unit_maps[0]
    assert bool((m[..., 0] == m[..., 0].max()).all()) and bool((m[..., -1] == m[..., -1].max()).all())


def test_random_is_kv_and_batch_compatible(tiny_folder):
    eng = api.load(tiny_folder("llama", layers=6)[0])
    pol = RandomSkip(budget=0.6)
    pol.calibrate(eng, [])
    ids = torch.randint(3, 97, (2, 18), generator=torch.Generator().manual_seed(3))
    full = eng.forward(ids, None, pol.planner(eng)).logits
    cache = eng.new_cache(2, 18)
    planner = pol.planner(eng)
    eng.forward(ids[:, :7], cache, planner)
    steps = [eng.forward(ids[:, t:t + 1], cache, planner, phase="decode").logits[:, 0] for t in range(7, 18)]
    assert (torch.stack(steps, 1) - full[:, 7:]).abs().max() < TOL
    alone = eng.forward(ids[1:], None, pol.planner(eng)).logits
    assert (alone - full[1:]).abs().max() < TOL
    assert RandomSkip.kv_compatible and RandomSkip.batch_compatible and RandomSkip.real


def test_random_budget_one_is_dense(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    assert RandomSkip(budget=1.0).planner(eng) is None
