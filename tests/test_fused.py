"""The compiled layer halves (engine/fused.cpp) against the Python ones they replace: same bits, every path."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import ponder.api as api
from ponder.engine import LayerPlan, SamplingConfig, Stats, fused
from ponder.engine.forward import PlannerBase
from ponder.engine.steps import FusedSteps, PythonSteps
from ponder.policies import registry

can_build = shutil.which(os.environ.get("CXX", "c++")) is not None and fused.enabled()


@pytest.mark.skipif(not can_build, reason="no C++ compiler here, or PONDER_FUSED=0: the Python path runs")
def test_fused_steps_are_built_and_used(tiny_folder):
    """With a compiler the set-up builds them and a CPU engine uses them: a broken build must not pass unnoticed."""
    assert fused.load() is not None and fused.status() == "cpp"
    assert api.load(tiny_folder("llama")[0]).steps.name == "cpp"
    _, hf = tiny_folder("llama")
    assert api.from_hf(hf).steps.name == "python"  # borrowed, unfused weights: the reference halves


class _Counting:
    """The compiled module, counting calls per step: an equality test must show the fused side ran fused."""

    def __init__(self, mod):
        self.mod, self.calls = mod, {}

    def __getattr__(self, name):
        f = getattr(self.mod, name)

        def call(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return f(*a)

        return call


def _pair(folder, dtype):
    a, b = api.load(folder, dtype=dtype), api.load(folder, dtype=dtype)
    if not isinstance(a.steps, FusedSteps):
        pytest.skip("fused steps not available here")
    a.steps.mod = _Counting(a.steps.mod)
    b.steps = PythonSteps(b.cfg)
    return a, b


class _Mixed(PlannerBase):
    """Every planned shape the fused steps serve: layer 0 skipped by every row but its K/V computed; layer 1's FFN
    skipped by row 0; layer 2's FFN run by an explicit all-rows index set (the no-gather path); layer 3 skipped by
    row 0 with K/V computed while the other rows run it (they reuse the normed rows)."""

    def layer(self, i, x, ctx):
        N = ctx.B * ctx.T
        none = torch.empty(0, dtype=torch.long)
        return [LayerPlan(attn=none, ffn=none, kv="compute"), LayerPlan(attn=None, ffn=torch.arange(1, N)),
                LayerPlan(attn=None, ffn=torch.arange(N)),
                LayerPlan(attn=torch.arange(1, N), ffn=torch.arange(1, N), kv="compute")][i]


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                          ("llama", "bfloat16")])
def test_fused_steps_give_the_same_bits(tiny_folder, family, dtype):
    """Padded batch, prefill then decode, dense and planned: logits and caches identical to the Python halves.
    (qwen2 has attention biases; qwen3's q/k norms keep its attention half in Python; its K/V-only step and its
    FFN half are fused.)"""
    fz, py = _pair(tiny_folder(family)[0], dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [90]]
    for planner in (None, _Mixed()):
        outs = []
        for eng in (fz, py):
            ids = torch.zeros(3, 7, dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, 7 - len(p):] = torch.tensor(p)
            cache = eng.new_cache(3, 16)
            cache.set_padding(torch.tensor([7 - len(p) for p in prompts]))
            lg = [eng.forward(ids, cache, planner=planner).logits]
            for _ in range(5):
                nxt = lg[-1][:, -1].argmax(-1)[:, None]
                lg.append(eng.forward(nxt, cache, planner=planner, phase="decode").logits)
            outs.append((torch.cat(lg, 1), cache.k.clone(), cache.v.clone()))
        for x, y in zip(*outs):
            assert torch.equal(x, y)
    want = {"ffn", "decode_kv"} | ({"decode_attn"} if family != "qwen3" else set())
    assert want <= set(fz.steps.mod.calls)


def test_fused_steps_keep_policy_decisions_and_counts(tiny_folder):
    """A per-token policy (ffn-skip decides from the states the halves produce) sees the same states either way."""
    fz, py = _pair(tiny_folder("llama", layers=6)[0], "float32")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
    runs = []
    for eng in (fz, py):
        pol = registry.get("ffn-skip", threshold=0.0, warmup=3)  # permissive: every token past warm-up skips
        st = Stats(eng.cfg)
        r = pol.generate(eng, prompts, SamplingConfig(max_new_tokens=10), st)
        runs.append((r.tokens, st.summary()))
    assert runs[0] == runs[1]
    assert runs[0][1]["flops_fraction"] < 0.9  # FFNs were skipped (and warm-up positions ran theirs)
    assert {"ffn", "decode_attn"} <= set(fz.steps.mod.calls)


def test_fused_steps_keep_random_skipping_identical(tiny_folder):
    """Layers skipped per token with their K/V still computed (``random``): same tokens, same counted work."""
    fz, py = _pair(tiny_folder("qwen3", layers=6)[0], "float32")
    runs = []
    for eng in (fz, py):
        st = Stats(eng.cfg)
        r = registry.get("random", 0.6).generate(eng, [[5, 6, 7, 8, 9, 10], [40, 41]],
                                                 SamplingConfig(max_new_tokens=10), st)
        runs.append((r.tokens, st.summary()))
    assert runs[0] == runs[1]
    assert runs[0][1]["flops_fraction"] < 0.9
    assert "decode_kv" in fz.steps.mod.calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_multi_token_steps_give_the_same_bits(tiny_folder, family):
    """Steps of several tokens (prefill, scoring, speculative verification) through each attention route: causal
    SDPA (unpadded prefill), masked SDPA (padded, more than ``SMALL_TQ`` queries), masked batched matmuls (a few
    queries per row)."""
    fz, py = _pair(tiny_folder(family)[0], "float32")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 40), generator=g)
    outs = []
    for eng in (fz, py):
        res = [eng.forward(ids[:, :20]).logits]  # causal, no mask
        cache = eng.new_cache(2, 40)
        cache.set_padding(torch.tensor([0, 3]))  # row 1 left-padded by three
        res.append(eng.forward(ids[:, :20], cache).logits)  # masked, 20 queries
        res.append(eng.forward(ids[:, 20:24], cache, phase="verify").logits)  # masked, 4 queries
        res.append(eng.forward(ids[:, 24:25], cache, phase="decode").logits)
        outs.append(res + [cache.k.clone(), cache.v.clone()])
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    assert fz.steps.mod.calls.get("attn_rows", 0) >= 3 * fz.cfg.num_hidden_layers
