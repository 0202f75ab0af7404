"""Tiny GGUF files written with the ``gguf`` package's own writer, so the GGUF tests need no download.

The weights start in Hugging Face order, are permuted the way llama.cpp's converter does for the llama
architecture, and are quantised (reference quantiser) or, for the K types the package cannot quantise, filled with
random blocks whose scale fields are set to small finite values.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

D, F, H, HK, HD, L = 256, 512, 4, 2, 64, 2
_F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def byte_tokens() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    toks = byte_tokens()
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    toks += ["Ġt", "he", "Ġthe", "in"]
    types = [1] * len(toks)
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        toks.append(s)
        types.append(3)
    return toks, types, merges


def quantise(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    t = T[qtype]
    if qtype in ("F32",):
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype in _F16_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[t]
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for off in _F16_FIELDS[qtype]:
            raw[..., off:off + 2] = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(w.astype(np.float32), t)


def write_tiny_gguf(path: Path, qtype: str = "F32", arch: str = "llama", seed: int = 0, tied: bool = True,
                    with_tokenizer: bool = True) -> dict[str, np.ndarray]:
    """Write a 2-layer model; returns its float weights in Hugging Face order (before quantisation)."""
    from ponder.models.gguf import permute_rows

    rng = np.random.default_rng(seed)
    toks, types, merges = tiny_vocab()
    V = len(toks)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(HK)
    w.add_rope_dimension_count(HD)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(0)
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(V - 2)
        w.add_eos_token_id(V - 1)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf: dict[str, np.ndarray] = {}

    def mat(rows: int, cols: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name: str, hfname: str, a: np.ndarray, quant: bool = True, heads: int | None = None) -> None:
        hf[hfname] = a
        g = a if heads is None else permute_rows(torch.from_numpy(a), heads).numpy()
        if quant and qtype != "F32":
            q = quantise(g, qtype, rng)
            w.add_tensor(name, q, raw_dtype=T[qtype] if q.dtype == np.uint8 else None)
        else:
            w.add_tensor(name, np.ascontiguousarray(g, dtype=np.float32))

    add("token_embd.weight", "model.embed_tokens.weight", mat(V, D, 0.5))
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight",
            1 + 0.1 * rng.standard_normal(D).astype(np.float32), False)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight",
            1 + 0.1 * rng.standard_normal(D).astype(np.float32), False)
        perm = arch == "llama"
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", mat(H * HD, D), heads=H if perm else None)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", mat(HK * HD, D), heads=HK if perm else None)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", mat(HK * HD, D))
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias",
                0.1 * rng.standard_normal(H * HD).astype(np.float32), False)
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias",
                0.1 * rng.standard_normal(HK * HD).astype(np.float32), False)
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias",
                0.1 * rng.standard_normal(HK * HD).astype(np.float32), False)
        if arch == "qwen3":
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight",
                1 + 0.1 * rng.standard_normal(HD).astype(np.float32), False)
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight",
                1 + 0.1 * rng.standard_normal(HD).astype(np.float32), False)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", mat(D, H * HD))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", mat(F, D))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", mat(F, D))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", mat(D, F))
    add("output_norm.weight", "model.norm.weight", np.ones(D, dtype=np.float32), False)
    if not tied:
        add("output.weight", "lm_head.weight", mat(V, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
