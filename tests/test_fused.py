"""The compiled layer halves (engine/fused.cpp) against the Python ones they replace: same bits, every path."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import ponder.api as api
from ponder.engine import LayerPlan, SamplingConfig, Stats, generate
from ponder.engine import fused
from ponder.policies import registry

can_build = shutil.which(os.environ.get("CXX", "c++")) is not None and fused.enabled()


@pytest.mark.skipif(not can_build, reason="no C++ compiler here, or PONDER_FUSED=0: the Python path runs")
def test_fused_steps_are_built_and_used(tiny_folder):
    """With a compiler the set-up builds them and a CPU engine uses them: a broken build must not pass unnoticed."""
    assert fused.load() is not None and fused.status() == "cpp"
    assert api.load(tiny_folder("llama")[0])._fused is not None
    _, hf = tiny_folder("llama")
    assert api.from_hf(hf)._fused is None  # borrowed, unfused weights: the Python halves


def _pair(folder, dtype):
    a, b = api.load(folder, dtype=dtype), api.load(folder, dtype=dtype)
    if a._fused is None:
        pytest.skip("fused steps not available here")
    b._fused = None
    return a, b


class _HalfFFN:
    """Row 0 of every middle layer skips its FFN, the rest run it; layer 2 runs it for every row (an explicit
    all-rows index set, which takes the no-gather path)."""

    def layer(self, i, x, ctx):
        N = ctx.B * ctx.T
        if i == 1:
            return LayerPlan(attn=None, ffn=torch.arange(1, N))
        if i == 2:
            return LayerPlan(attn=None, ffn=torch.arange(N))
        return None


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                          ("llama", "bfloat16")])
def test_fused_steps_give_the_same_bits(tiny_folder, family, dtype):
    """Padded batch, prefill then decode, dense and planned: logits and caches identical to the Python halves.
    (qwen2 has attention biases; qwen3's q/k norms keep its attention half in Python, its FFN half fused.)"""
    fz, py = _pair(tiny_folder(family)[0], dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [90]]
    for planner in (None, _HalfFFN()):
        outs = []
        for eng in (fz, py):
            ids = torch.zeros(3, 7, dtype=torch.long)
            pad = torch.zeros(3, 7, dtype=torch.bool)
            for r, p in enumerate(prompts):
                ids[r, 7 - len(p):] = torch.tensor(p)
                pad[r, :7 - len(p)] = True
            cache = eng.new_cache(3, 16)
            cache.valid[:, :7] = ~pad
            cache.padded = True
            lg = [eng.forward(ids, cache, planner=planner).logits]
            for _ in range(5):
                nxt = lg[-1][:, -1].argmax(-1)[:, None]
                lg.append(eng.forward(nxt, cache, planner=planner, phase="decode").logits)
            outs.append((torch.cat(lg, 1), cache.k.clone(), cache.v.clone()))
        for x, y in zip(*outs):
            assert torch.equal(x, y)


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
