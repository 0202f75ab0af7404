"""Every registered policy against its own flags, on a tiny random 8-layer model.

A flag is a claim; this matrix is where each claim is checked: budget 1.0 is the dense model; batch_compatible means a
padded batch equals its rows alone; kv_compatible means cached decoding equals recomputing the same tokens in one
pass; lossless means greedy output equals dense at every budget; meets_budget means the engine-counted FLOPs fraction
stays within the budget; a calibrated threshold meets the budget on its calibration text.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CALIB, tol
from ponder.engine import SamplingConfig, Stats, generate
from ponder.errors import PonderError
from ponder.policies import registry
from ponder.policies.budget import realized

NAMES = registry.names()
G = torch.Generator().manual_seed(11)
PROMPTS = [torch.randint(3, 97, (n,), generator=G).tolist() for n in (7, 3, 11)]
SC = SamplingConfig(max_new_tokens=10)


@pytest.fixture(params=["float32", "q4_1"])
def eng(request, eng):
    """Every claim is checked on both weight forms: float32 and block-quantised (the kernels' path)."""
    return eng if request.param == "float32" else request.getfixturevalue("qeng")


_ROUTERS: dict[int, str] = {}


def adapter_kw(name: str, eng) -> dict:
    """A policy that runs a trained adapter gets one made for this very engine: a random router (its decisions
    vary from token to token, which is what the flags' claims must survive)."""
    if getattr(registry._REGISTRY[name], "adapter_kind", None) != "router":
        return {}
    if id(eng) not in _ROUTERS:
        import tempfile
        from pathlib import Path

        from ponder.models.adapters import Router, fingerprint, save_adapter

        g = torch.Generator().manual_seed(7)
        L, D = eng.cfg.num_hidden_layers, eng.cfg.hidden_size
        p = Path(tempfile.mkdtemp()) / "router.safetensors"
        save_adapter(p, Router(torch.randn(L, 2, D, generator=g) * 0.3, torch.randn(L, 2, generator=g)).tensors(),
                     {"kind": "router", "base_fingerprint": fingerprint(eng.model), "units": "attn+ffn"})
        _ROUTERS[id(eng)] = str(p)
    return {"router": _ROUTERS[id(eng)]}


def make(name: str, budget: float, eng):
    pol = registry.get(name, budget, **adapter_kw(name, eng))
    try:
        pol.calibrate(eng, CALIB)
        pol.planner(eng)
    except PonderError as e:
        if "minimum reachable" in str(e):
            pytest.skip(f"{name} cannot reach budget {budget} on the tiny model: {e}")
        raise
    return pol


def overrides_generate(pol) -> bool:
    from ponder.policies.base import Policy

    return type(pol).generate is not Policy.generate


@pytest.mark.parametrize("name", NAMES)
def test_budget_one_equals_dense(eng, name):
    pol = make(name, 1.0, eng)
    ids = torch.tensor([CALIB[0][:24], CALIB[1][:24]])
    out = eng.forward(ids, planner=pol.planner(eng), phase="score").logits
    assert (out - eng.forward(ids).logits).abs().max() < tol(eng)
    assert pol.generate(eng, PROMPTS, SC).tokens == generate(eng, PROMPTS, SC).tokens


@pytest.mark.parametrize("budget", [0.75, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_rows_alone(eng, name, budget):
    cls = registry._REGISTRY[name]
    if not cls.batch_compatible:
        pytest.skip(f"{name} does not claim batch compatibility")
    pol = make(name, budget, eng)
    batched = pol.generate(eng, PROMPTS, SC).tokens
    assert batched == [pol.generate(eng, [p], SC).tokens[0] for p in PROMPTS]


@pytest.mark.parametrize("budget", [0.75, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_recomputation(eng, name, budget):
    """One token at a time through the KV cache equals the same tokens in one teacher-forced pass (same planner
    semantics: the prompt as prefill, the continuation as decode), logits and all."""
    cls = registry._REGISTRY[name]
    if not cls.kv_compatible:
        pytest.skip(f"{name} does not claim KV compatibility")
    pol = make(name, budget, eng)
    prompt = PROMPTS[0]
    cont = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    n = len(prompt) + cont.shape[1]

    def prefill(planner):
        cache = eng.new_cache(1, n)
        first = eng.forward(torch.tensor([prompt]), cache, planner, logits="last", phase="prefill").logits
        return cache, first

    pl = pol.planner(eng)
    cache, first = prefill(pl)
    steps = [eng.forward(cont[:, t:t + 1], cache, pl, logits="last", phase="decode").logits
             for t in range(cont.shape[1])]
    pl2 = pol.planner(eng)
    cache2, first2 = prefill(pl2)
    once = eng.forward(cont, cache2, pl2, logits="all", phase="decode").logits
    assert (first - first2).abs().max() < tol(eng)
    assert (torch.stack(steps, 1) - once).abs().max() < tol(eng)
    if overrides_generate(pol) and cls.lossless:  # generation strategies: their tokens are the dense argmax
        toks = pol.generate(eng, [prompt], SC).tokens[0]
        assert toks == generate(eng, [prompt], SC).tokens[0]


@pytest.mark.parametrize("name", NAMES)
def test_lossless_means_dense_greedy_at_every_budget(eng, name):
    cls = registry._REGISTRY[name]
    if not cls.lossless:
        pytest.skip(f"{name} does not claim to be lossless")
    dense = generate(eng, PROMPTS, SamplingConfig(max_new_tokens=16)).tokens
    for budget in (0.2, 0.5, 0.75, 1.0):
        pol = make(name, budget, eng)
        assert pol.generate(eng, PROMPTS, SamplingConfig(max_new_tokens=16)).tokens == dense
        assert [pol.generate(eng, [p], SamplingConfig(max_new_tokens=16)).tokens[0] for p in PROMPTS] == dense


@pytest.mark.parametrize("budget", [0.8, 0.6])
@pytest.mark.parametrize("name", NAMES)
def test_flops_within_budget_where_promised(eng, name, budget):
    cls = registry._REGISTRY[name]
    pol = make(name, budget, eng)
    checked = False
    if getattr(cls, "meets_budget", False):  # a promise on any text
        st = Stats(eng.cfg)
        eng.forward(torch.tensor(CALIB[:3]), planner=pol.planner(eng), stats=st, phase="score")
        assert st.flops_fraction <= budget + 0.01
        checked = True
    cal = getattr(pol, "calibration", {}) or {}
    if "calibration_fraction" in cal:  # a promise on the calibration text
        assert cal["calibration_fraction"] <= budget + 1e-9
        assert realized(eng, pol, CALIB).fraction <= budget + 0.01
        checked = True
    if not checked:
        pytest.skip(f"{name} makes no FLOPs promise")


@pytest.mark.parametrize("name", NAMES)
def test_budget_outside_unit_interval_is_refused(name):
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(PonderError, match="budget"):
            registry.get(name, bad)


@pytest.mark.parametrize("name", NAMES)
def test_flags_are_declared(name):
    flags = registry._REGISTRY[name].flags()
    assert set(flags) == {"real", "kv_compatible", "batch_compatible", "training_free", "lossless"}
    assert all(isinstance(v, bool) for v in flags.values())
