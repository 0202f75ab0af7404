"""The runtime against transformers, and the plan machinery against references computed another way."""

from __future__ import annotations

import pytest
import torch

import ponder.api as api
from conftest import FAMILIES
from ponder.engine import LayerPlan, SamplingConfig, Stats, generate
from ponder.engine.forward import PlannerBase
from ponder.errors import PonderError

TOL = 2e-5  # float32; observed max |diff| ~3e-7 on these sizes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers(tiny_folder, family, tie):
    folder, hf = tiny_folder(family, tie=tie)
    eng = api.load(folder)
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (eng.forward(ids).logits - ref).abs().max() < TOL
    assert (api.from_hf(hf).forward(ids).logits - ref).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_equals_transformers(tiny_folder, family):
    folder, hf = tiny_folder(family)
    eng = api.load(folder)
    prompt = [5, 17, 33, 8, 61]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = generate(eng, [prompt], SamplingConfig(max_new_tokens=12)).tokens[0]
    assert out == ref
    assert generate(api.from_hf(hf), [prompt], SamplingConfig(max_new_tokens=12)).tokens[0] == ref


def test_from_hf_shares_tensors(tiny_folder):
    _, hf = tiny_folder("llama")
    eng = api.from_hf(hf)
    assert eng.layers[0].wq.data_ptr() == hf.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert eng.embed.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_kv_cached_decode_equals_recompute(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    full = eng.forward(ids).logits
    cache = eng.new_cache(1, 16)
    eng.forward(ids[:, :9], cache)
    steps = [eng.forward(ids[:, t:t + 1], cache, phase="decode").logits[:, 0] for t in range(9, 16)]
    assert (torch.stack(steps, 1) - full[:, 9:]).abs().max() < TOL


def test_padded_batch_equals_rows_alone(tiny_folder):
    eng = api.load(tiny_folder("qwen2")[0])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [90]]
    sc = SamplingConfig(max_new_tokens=8)
    batched = generate(eng, prompts, sc).tokens
    assert batched == [generate(eng, [p], sc).tokens[0] for p in prompts]


def _remove_layer(eng_folder, i):
    from ponder.engine.forward import Engine
    from ponder.models.loader import load_folder

    m, _ = load_folder(eng_folder)
    del m.model.layers[i]
    m.config.num_hidden_layers -= 1
    return Engine(m)


class Fixed(PlannerBase):
    def __init__(self, plans):
        self.plans = plans

    def layer(self, i, x, ctx):
        return self.plans[i] if callable(self.plans[i]) is False else self.plans[i](ctx)


def test_all_active_plan_equals_dense(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    every = torch.arange(24)
    plans = [LayerPlan(attn=every, ffn=every)] * 4
    # Force the planned path with explicit index sets covering all rows.
    out = eng.forward(ids, planner=Fixed(plans)).logits
    assert (out - eng.forward(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("kv", ["none", "compute"])
def test_skip_layer_for_all_equals_removed_layer(tiny_folder, kv):
    folder = tiny_folder("llama")[0]
    eng = api.load(folder)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    plans = [None, LayerPlan.skip(kv=kv), None, None]
    out = eng.forward(ids, planner=Fixed(plans)).logits
    ref = _remove_layer(folder, 1).forward(ids).logits
    assert (out - ref).abs().max() < TOL


def _token_by_token(eng, ids, skip):
    """Reference: one token at a time, no cache tricks: hidden states kept per layer, skipped units are identity.

    ``skip[t][i]`` = (skip_attn, skip_ffn); with kv='compute' a skipped token's K/V come from its incoming state."""
    from ponder.models.llama import apply_rope, rms_norm

    c = eng.cfg
    B, T = ids.shape
    H, Hk, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out = []
    for b in range(B):
        x = torch.nn.functional.embedding(ids[b], eng.embed)  # (T, D)
        for i, w in enumerate(eng.layers):
            h = rms_norm(x, w.ln1, c.rms_norm_eps)
            q, k, v = w.qkv(h)
            cos, sin = eng.rope(torch.arange(T), T)
            q = apply_rope(q.view(T, H, hd), cos, sin)
            k = apply_rope(k.view(T, Hk, hd), cos, sin)
            v = v.view(T, Hk, hd)
            new = x.clone()
            for t in range(T):
                if skip[b][t][i][0]:
                    continue
                kk = k[: t + 1].repeat_interleave(H // Hk, 1)
                vv = v[: t + 1].repeat_interleave(H // Hk, 1)
                att = torch.einsum("hd,khd->hk", q[t], kk) / hd ** 0.5
                o = torch.einsum("hk,khd->hd", att.softmax(-1), vv).reshape(-1)
                new[t] = x[t] + torch.nn.functional.linear(o, w.wo)
            x = new
            for t in range(T):
                if not skip[b][t][i][1]:
                    x[t] = x[t] + w.mlp(rms_norm(x[t], w.ln2, c.rms_norm_eps))
        out.append(eng.logits(x))
    return torch.stack(out)


def test_partial_skip_equals_token_by_token_reference(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    B, T, L = 2, 10, 4
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (B, T), generator=g)
    skip_a = torch.rand(B, T, L, generator=g) < 0.4
    skip_f = torch.rand(B, T, L, generator=g) < 0.4
    plans = [LayerPlan.from_masks(~skip_a[:, :, i], ~skip_f[:, :, i], kv="compute") for i in range(L)]
    out = eng.forward(ids, planner=Fixed(plans)).logits
    skip = [[[(bool(skip_a[b, t, i]), bool(skip_f[b, t, i])) for i in range(L)] for t in range(T)] for b in range(B)]
    ref = _token_by_token(eng, ids, skip)
    assert (out - ref).abs().max() < 1e-4


def test_kv_none_masks_skipped_tokens(tiny_folder):
    """With kv='none', a token that skips attention is invisible to later queries in that layer."""
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 3] = False
    plans = [None, LayerPlan.from_masks(mask, None, kv="none"), None, None]
    out = eng.forward(ids, planner=Fixed(plans)).logits
    # Reference: same thing by decoding one token at a time with the cache (holes persist across steps).
    cache = eng.new_cache(1, 8)
    steps = []
    for t in range(8):
        m = torch.ones(1, 1, dtype=torch.bool)
        if t == 3:
            m[0, 0] = False
        p = [None, LayerPlan.from_masks(m, None, kv="none"), None, None]
        steps.append(eng.forward(ids[:, t:t + 1], cache, planner=Fixed(p), phase="decode").logits[:, 0])
    assert (torch.stack(steps, 1) - out).abs().max() < TOL
    assert 1 in cache.holes and not bool(cache.holes[1][0, 3]) and bool(cache.holes[1][0, 4])
    # ...and it differs from kv='compute', so the mask really changed something.
    plans_c = [None, LayerPlan.from_masks(mask, None, kv="compute"), None, None]
    assert (eng.forward(ids, planner=Fixed(plans_c)).logits[0, 4:] - out[0, 4:]).abs().max() > 1e-4


def test_stats_count_real_work(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (1, 8))
    st = Stats(eng.cfg)
    eng.forward(ids, stats=st)
    assert st.flops_fraction == pytest.approx(1.0)
    st2 = Stats(eng.cfg)
    eng.forward(ids, planner=Fixed([None, LayerPlan.skip(), LayerPlan.skip(), None]), stats=st2)
    assert st2.flops_fraction == pytest.approx(0.5)
    assert st2.weight_bytes_fraction == pytest.approx(0.5)
    assert st2.layers_used()[0].tolist() == [[2] * 8]


def test_sampling_is_seeded_and_respects_top_k(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    sc = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=5, seed=7)
    a = generate(eng, [[5, 6, 7]], sc).tokens
    assert a == generate(eng, [[5, 6, 7]], sc).tokens
    sc1 = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=3)
    assert (generate(eng, [[5, 6, 7]], sc1).tokens
            == generate(eng, [[5, 6, 7]], SamplingConfig(max_new_tokens=10)).tokens)


def test_stop_tokens_and_streaming(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    free = generate(eng, [[5, 6, 7]], SamplingConfig(max_new_tokens=10)).tokens[0]
    seen = []
    res = generate(eng, [[5, 6, 7]], SamplingConfig(max_new_tokens=10, stop_tokens=(free[2],)),
                   on_token=lambda r, t: seen.append(t))
    assert res.tokens[0] == free[:3] and res.finish == ["stop"] and seen == free[:3]


def test_cache_truncation_rewrites(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(8))
    cache = eng.new_cache(1, 12)
    eng.forward(ids[:, :6], cache)
    eng.forward(torch.tensor([[1, 2, 3]]), cache)  # a rejected draft
    cache.truncate(6)
    out = eng.forward(ids[:, 6:], cache).logits
    assert (out - eng.forward(ids).logits[:, 6:]).abs().max() < TOL


def test_bad_inputs(tmp_path, tiny_folder):
    with pytest.raises(PonderError, match="does not exist"):
        api.load(tmp_path / "nope")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, '
                                                  '"intermediate_size": 8, "num_hidden_layers": 1, '
                                                  '"num_attention_heads": 2}')
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(PonderError, match="pickle.*save_pretrained"):
        api.load(tmp_path / "pk")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(PonderError, match="supports.*llama"):
        api.load(tmp_path / "gpt")
    folder, _ = tiny_folder("llama")
    eng = api.load(folder)
    with pytest.raises(PonderError, match="empty"):
        generate(eng, [[]], SamplingConfig(max_new_tokens=4))
    with pytest.raises(PonderError, match="exceeds the model's context"):
        generate(eng, [[5] * 120], SamplingConfig(max_new_tokens=20))
    with pytest.raises(PonderError, match="float16 is not supported on CPU"):
        api.load(folder, dtype="float16")


def test_shape_mismatch_and_corrupt_weights(tmp_path, tiny_folder):
    import json
    import shutil

    folder, _ = tiny_folder("llama")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PonderError, match="different models"):
        api.load(bad)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PonderError, match="corrupt or truncated"):
        api.load(corrupt)


def test_bfloat16_on_cpu_tracks_float32(tiny_folder):
    folder, _ = tiny_folder("llama")
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(9))
    ref = api.load(folder).forward(ids).logits
    bf = api.load(folder, dtype="bfloat16")
    assert bf.embed.dtype == torch.bfloat16
    out = bf.forward(ids).logits.float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_decode_attention_with_padding_and_gqa(tiny_folder):
    """The single-query attention path (decode) agrees with full recomputation for padded GQA batches."""
    eng = api.load(tiny_folder("qwen3")[0])
    prompts = [[5, 6, 7, 8, 9], [40, 41]]
    sc = SamplingConfig(max_new_tokens=6)
    out = generate(eng, prompts, sc).tokens
    for p, o in zip(prompts, out):
        full = eng.forward(torch.tensor([p + o[:-1]])).logits[0, len(p) - 1:].argmax(-1).tolist()
        assert full == o


REF = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "ref"


@pytest.mark.skipif(not (REF / "model.safetensors").is_file(), reason="models/ref not present")
def test_shipped_model_equals_transformers():
    import transformers

    eng = api.load("ref")
    hf = transformers.AutoModelForCausalLM.from_pretrained(REF, dtype=torch.float32).eval()
    ids = torch.tensor([eng.tokenizer.encode("def main(argv):\n    return 0\n")])
    with torch.no_grad():
        ref = hf(ids).logits
    assert (eng.forward(ids).logits - ref).abs().max() < 1e-3
    assert eng.cfg.num_hidden_layers >= 12
