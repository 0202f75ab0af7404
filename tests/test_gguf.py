"""GGUF loading on tiny files written with the gguf package's writer: every listed type against the reference
dequantiser and transformers' own GGUF loader, the Q/K permutation, the F32 writer, and the bad-input lines."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from gguf_util import write_tiny_gguf
from ponder.errors import PonderError
from ponder.models.gguf import SUPPORTED_TYPES, permute_rows, read_gguf, unpermute_rows, write_gguf

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def _hf_model(path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _hf_from_weights(path: Path):
    """transformers 5.24's GGUF loader mis-sizes a small qwen3 (it takes head_dim from its own default), so for
    qwen3 the oracle is transformers' Qwen3 model built from the file's numbers with the dequantised weights."""
    import transformers as tf

    w, _, cfg = read_gguf(path)
    hc = tf.Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                        max_position_embeddings=cfg.max_position_embeddings)
    m = tf.Qwen3ForCausalLM(hc).eval()
    missing, unexpected = m.load_state_dict(w, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    m.tie_weights()
    return m


def test_permutation_round_trip():
    w = torch.randn(4 * 64, 8)
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not torch.equal(permute_rows(w, 4), w)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantised_weights_match_reference_and_transformers(tmp_path, qtype):
    f = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(f, qtype)
    weights, info, cfg = read_gguf(f)
    assert cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings and info.arch == "llama"
    # the reference dequantiser on the raw blocks, permuted back by hand for Q and K
    r = gguf.GGUFReader(str(f))
    for t in r.tensors:
        ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
            tuple(reversed([int(s) for s in t.shape])))
        if t.name.endswith("attn_q.weight"):
            ref = unpermute_rows(ref, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            ref = unpermute_rows(ref, cfg.num_key_value_heads)
        name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
        if name is None:
            i, rest = t.name.split(".", 2)[1:]
            name = next(k for k in weights if k.startswith(f"model.layers.{i}.") and
                        k.endswith({"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight":
                                    "post_attention_layernorm.weight", "attn_q.weight": "q_proj.weight",
                                    "attn_k.weight": "k_proj.weight", "attn_v.weight": "v_proj.weight",
                                    "attn_output.weight": "o_proj.weight", "ffn_gate.weight": "gate_proj.weight",
                                    "ffn_up.weight": "up_proj.weight", "ffn_down.weight": "down_proj.weight"}[rest]))
        assert torch.equal(weights[name], ref), (qtype, t.name)
    # an independent oracle: transformers' GGUF loader, tensor by tensor
    hf = _hf_model(f).state_dict()
    for k, v in weights.items():
        assert torch.equal(hf[k].float(), v), (qtype, k)


def test_f32_file_keeps_hf_order_exactly(tmp_path):
    f = tmp_path / "tiny.gguf"
    src = write_tiny_gguf(f, "F32")
    weights, _, _ = read_gguf(f)
    for k, v in src.items():
        assert torch.equal(weights[k], torch.from_numpy(v)), k


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_1"), ("llama", "Q8_0"), ("qwen2", "F32"), ("qwen3", "Q4_K")])
def test_logits_match_transformers(tmp_path, arch, qtype):
    import ponder

    f = tmp_path / f"{arch}-{qtype}.gguf"
    write_tiny_gguf(f, qtype, arch=arch, tied=arch != "qwen2")
    eng = ponder.load(f, weights="float32")  # the float oracle: dequantised weights
    assert eng.cfg.attention_bias == (arch == "qwen2") and eng.cfg.qk_norm == (arch == "qwen3")
    ids = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 250]])
    with torch.inference_mode():
        a = eng.forward(ids).logits
        b = (_hf_model(f) if arch != "qwen3" else _hf_from_weights(f))(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert a.argmax(-1).equal(b.argmax(-1))


def test_greedy_generation_matches_transformers(tmp_path):
    import ponder
    from ponder.engine.generate import SamplingConfig, generate

    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "Q8_0")
    eng = ponder.load(f, weights="float32")  # the float oracle: dequantised weights
    prompt = [5, 60, 70, 80]
    ours = generate(eng, [prompt], SamplingConfig(max_new_tokens=12, stop_tokens=())).tokens[0]
    hf = _hf_model(f)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_writer_round_trip_keeps_weights_and_metadata(tmp_path):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "Q4_0")
    weights, info, cfg = read_gguf(f)
    out = write_gguf(tmp_path / "f32.gguf", weights, cfg, info.fields)
    w2, info2, cfg2 = read_gguf(out)
    assert set(w2) == set(weights) and all(torch.equal(w2[k], weights[k]) for k in weights)
    assert info2.fields["tokenizer.ggml.tokens"] == info.fields["tokenizer.ggml.tokens"]
    assert info2.chat_template == info.chat_template and info2.file_type == "F32"
    assert cfg2 == cfg
    assert not (tmp_path / "f32.gguf.part").exists()


# ---- bad input: one clear line each --------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PonderError, match=r"architecture 'gpt2' is not supported; ponder runs llama, mistral"):
        read_gguf(f)


def test_truncated_file(tmp_path):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "Q8_0")
    data = f.read_bytes()
    for cut in (len(data) // 2, 100):
        g = tmp_path / f"cut{cut}.gguf"
        g.write_bytes(data[:cut])
        with pytest.raises(PonderError, match="truncated or corrupt"):
            read_gguf(g)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(PonderError, match="not a readable GGUF"):
        read_gguf(f)


def test_unknown_type_id(tmp_path):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "F32")
    data = bytearray(f.read_bytes())
    i = data.index(b"output_norm.weight") + len("output_norm.weight")
    # tensor info: n_dims (u32) = 1, one u64 dim, then the type (u32)
    assert int.from_bytes(data[i:i + 4], "little") == 1
    data[i + 12:i + 16] = (200).to_bytes(4, "little")
    g = tmp_path / "badtype.gguf"
    g.write_bytes(bytes(data))
    with pytest.raises(PonderError, match="type"):
        read_gguf(g)


def test_type_without_dequantiser(tmp_path):
    f = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    for k, v in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                 ("attention.head_count", 1)):
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PonderError, match=r"quantisation type Q8_1, which ponder cannot dequantise; supported: F32"):
        read_gguf(f)


def test_refuses_when_memory_is_short(tmp_path, monkeypatch):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "F32")
    monkeypatch.setenv("PONDER_MEMORY_LIMIT", "100000")
    with pytest.raises(PonderError, match=r"needs .* GiB as float weights but only .* GiB of memory is free"):
        read_gguf(f)


def test_missing_file():
    with pytest.raises(PonderError, match="does not exist"):
        read_gguf("/nonexistent/model.gguf")


def test_supported_types_listed():
    assert set(TYPES) <= set(SUPPORTED_TYPES)


@pytest.mark.parametrize("weights", ["float32", "native"])
def test_bench_on_a_gguf_runs_the_llamacpp_peers_or_says_how_to_add_them(tmp_path, capsys, weights):
    """The bench opens a GGUF, and its llama.cpp rows either ran on the same prompt ids (the F32 file ponder writes
    from its own weights gives ponder's greedy tokens) or say they were not run and which command adds them. On
    native weights the same-weights peer is llama.cpp on the file itself, and every row records the form."""
    import json

    from ponder.cli import main
    from ponder.eval import peers

    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "Q8_0")
    data = tmp_path / "code.txt"
    data.write_text("the cat sat on the mat. " * 200)
    out = tmp_path / "out"
    args = ["bench", "--model", str(f), "--policies", "dense", "--budgets", "1", "--data", str(data), "--out",
            str(out), "--json", "--tokens", "200", "--kl-tokens", "100", "--prompts", "2", "--new-tokens", "6",
            "--probes", "0", "--repeats", "1", "--warmup", "0", "--batch", "2", "--prose", "none", "--threads", "1",
            "--no-progress", "--no-report", "--weights", weights]
    import os

    os.environ["PONDER_CACHE"] = str(tmp_path / "cache")
    try:
        assert main(args) == 0
    finally:
        del os.environ["PONDER_CACHE"]
    rows = {r["policy"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert all(r["env"]["weights"].startswith("native" if weights == "native" else "float32")
               for r in rows.values())
    lc = ("llama.cpp-f32", "llama.cpp-file") if weights == "float32" else ("llama.cpp-file",)
    assert {"dense", "dense-control", "transformers-generate", *lc} == set(rows)
    if weights == "native":
        r = rows["llama.cpp-file"]
        if peers.llamacpp_version() is not None:
            assert r["peer"]["weights"].startswith("Q8_0") and r["greedy_exact_match"] >= 0.5
        return
    assert rows["transformers-generate"]["greedy_exact_match"] == 1.0
    for name in lc:
        r = rows[name]
        if peers.llamacpp_version() is None:
            assert r["status"] == "not-run" and "setup-peers.sh" in r["timing_notes"][0]
        else:
            assert r["decode_ms_per_token"] > 0 and r["peer"]["library"] == "llama-cpp-python"
    if peers.llamacpp_version() is not None:
        assert rows["llama.cpp-f32"]["greedy_exact_match"] == 1.0  # the same weights: the same greedy tokens
        assert rows["llama.cpp-file"]["peer"]["weights"].startswith("Q8_0")


# ---- native block-quantised weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_native_load_keeps_the_blocks_and_their_values(tmp_path, qtype):
    """The default for a quantised file on CPU: the matrices stay in their blocks (Q/K rows un-permuted as blocks),
    and their values are the float load's bit for bit; the forward differs from float32 only by the activations'
    int8 rounding."""
    import ponder
    from ponder.models import quant
    from ponder.models.adapters import fingerprint

    f = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(f, qtype)
    nat, flt = ponder.load(f), ponder.load(f, weights="float32")
    assert nat.quantised and not flt.quantised and nat.weights_form.startswith(f"native {qtype} (")
    for (k, a), (k2, b) in zip(sorted(nat.model.state_dict().items()), sorted(flt.model.state_dict().items())):
        assert k == k2 and torch.equal(quant.dequantize(a), b.float()), k
    assert quant.is_interleaved(nat.layers[0].wqkv)  # 512 rows: the kernels' 8-row groups
    assert not quant.is_interleaved(nat.embed)  # 263 rows: planar, still quantised
    assert fingerprint(nat.model) == fingerprint(flt.model)
    ids = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 250]])
    a, b = nat.forward(ids).logits, flt.forward(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_quantised_gguf_written_by_ponder_reads_back_as_the_reference_blocks(tmp_path):
    import ponder
    from ponder.models import quant

    src = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(src, "F32")
    flt = ponder.load(src)
    assert not flt.quantised  # a float file stays float
    out = write_gguf(tmp_path / "q8.gguf", flt.model.state_dict(), flt.cfg, flt.gguf.fields, qtype="Q8_0")
    nat = ponder.load(out)
    want = quant.quantize(torch.from_numpy(hf["model.layers.1.self_attn.q_proj.weight"]), "Q8_0")
    assert torch.equal(quant.deinterleave(nat.model.model.layers[1].self_attn.q_proj.weight.data), want)
    with pytest.raises(PonderError, match="cannot write a Q4_K GGUF"):
        write_gguf(tmp_path / "x.gguf", flt.model.state_dict(), flt.cfg, flt.gguf.fields, qtype="Q4_K")


def test_a_type_without_a_kernel_is_named_with_its_fallback(tmp_path, capsys):
    import ponder

    f = tmp_path / "tiny-q4k.gguf"
    write_tiny_gguf(f, "Q4_K")
    with pytest.raises(PonderError, match=r"Q4_K, which has no native kernel .*--weights float32"):
        ponder.load(f, weights="native")
    eng = ponder.load(f)  # the default: dequantised, and said so on stderr (never a silent slow path)
    assert not eng.quantised and "no native kernel" in capsys.readouterr().err


def test_quantize_and_weights_bad_combinations_are_one_line(tmp_path):
    import ponder

    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, "F32")
    eng = ponder.load(f, quantize="q4_0")
    assert eng.quantised and "--quantize q4_0" in eng.weights_form
    with pytest.raises(PonderError, match="cannot be combined"):
        ponder.load(f, quantize="q8_0", weights="float32")
    with pytest.raises(PonderError, match="float32 activations"):
        ponder.load(f, weights="native", dtype="bfloat16")
    with pytest.raises(PonderError, match="unknown --weights"):
        ponder.load(f, weights="int3")
    with pytest.raises(PonderError, match="not supported; choose one of"):
        ponder.load(f, quantize="q2_k")
