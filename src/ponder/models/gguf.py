"""Open a GGUF file (llama.cpp's format) as a Llama-family model: config, weights and tokenizer from the file alone.

Why GGUF: it is what CPU users already have on disk (one file with weights, tokenizer, chat template and special
tokens), and the default model ships as one. The file is read with the ``gguf`` package, the format's reference
reader, and every tensor is dequantised by its reference dequantiser (``gguf.quants.dequantize``), so ponder's
float weights are by construction the ones llama.cpp's own tools define. llama.cpp's converter permutes the rows of
Q and K for its rotary layout (interleaved pairs); for the ``llama`` architecture they are permuted back here so the
weights run with Hugging Face's half-split rotary, as transformers' GGUF loader does.

Nothing here decides anything: this module only turns a file into tensors under Hugging Face names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from ..errors import PonderError
from . import quant
from .config import ModelConfig

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
# The types the reference dequantiser is tested against here (tests/test_gguf.py), by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# GGUF tensor name (per block ``blk.N.``) -> Hugging Face parameter name (per layer ``model.layers.N.``)
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


@dataclass
class GGUFInfo:
    """What a GGUF file says about itself beyond the weights: kept on the engine for the tokenizer, chat and peers."""

    path: Path
    arch: str
    fields: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    file_type: str = ""  # e.g. "Q4_1": the most common type of the 2-D tensors

    @property
    def chat_template(self) -> str | None:
        t = self.fields.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t.strip() else None


def _reader(path: Path):
    try:
        return gguf.GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OSError, AssertionError, TypeError) as e:
        msg = str(e)
        if "GGMLQuantizationType" in msg or "GGUFValueType" in msg:
            raise PonderError(f"{path} uses a tensor or value type this gguf reader does not know ({msg}); "
                              f"supported tensor types: {', '.join(SUPPORTED_TYPES)}") from None
        raise PonderError(f"{path} is not a readable GGUF file: truncated or corrupt ({msg or type(e).__name__}); "
                          "re-download or re-convert it") from None


def read_fields(reader: Any) -> dict[str, Any]:
    """The metadata as plain Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on malformed fields
            raise PonderError(f"GGUF metadata field {k!r} is corrupt ({e}); "
                              "re-download or re-convert the file") from None
    return out


def config_from_fields(fields: dict[str, Any], n_vocab: int | None = None) -> ModelConfig:
    """The runtime's ModelConfig from a GGUF's ``<arch>.*`` keys (llama.cpp's names)."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise PonderError(f"GGUF architecture {arch!r} is not supported; ponder runs {', '.join(SUPPORTED_ARCHS)}")

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        v = fields.get(f"{arch}.{key}", default)
        if v is None and required:
            raise PonderError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete, re-convert it")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads, required=False) or hidden // heads)
    rope_dim = get("rope.dimension_count", head_dim, required=False)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise PonderError(f"partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported")
    vocab = get("vocab_size", None, required=False)
    if vocab is None:
        vocab = n_vocab if n_vocab is not None else len(fields.get("tokenizer.ggml.tokens") or [])
    scaling = None
    stype = get("rope.scaling.type", None, required=False)
    if stype == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif stype not in (None, "none"):
        raise PonderError(f"GGUF rope scaling {stype!r} is not supported; supported: none, linear, llama3 factors")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    mt = "llama" if arch == "mistral" else arch
    swa = get("attention.sliding_window", None, required=False)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads, required=False) or heads),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048, required=False)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6, required=False)),
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
        rope_scaling=scaling,
        tie_word_embeddings=True,  # set from the tensors by the loader
        attention_bias=False,  # set from the tensors by the loader
        qk_norm=arch == "qwen3",
        model_type=mt,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=[int(eos)] if eos is not None else [],
        sliding_window=int(swa) if swa else None,
    )


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (its converter's ``permute``): within each head, rows stored as
    interleaved rotary pairs go back to Hugging Face's first-half / second-half order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``unpermute_rows``: Hugging Face order to llama.cpp's (for writing a GGUF)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(need: int, what: str) -> None:
    """Refuse, before allocating, a load that cannot fit (``PONDER_MEMORY_LIMIT`` bytes overrides what is free)."""
    lim = os.environ.get("PONDER_MEMORY_LIMIT")
    avail = int(lim) if lim else _available_bytes()
    if avail is not None and need > 0.9 * avail:
        raise PonderError(f"{what} needs {need / 2**30:.2f} GiB as float weights but only {avail / 2**30:.2f} GiB "
                          "of memory is free; free memory, or use a smaller or more quantised model")


FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_matrix_types(path: str | Path) -> set[str]:
    """The tensor types of a GGUF's matrices (reads the header only)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PonderError(f"GGUF file {p} does not exist" if not p.exists() else f"{p} is not a file")
    return {t.tensor_type.name for t in _reader(p).tensors if len(t.shape) == 2}


def read_gguf(path: str | Path, native: bool = False) -> tuple[dict[str, torch.Tensor], GGUFInfo, ModelConfig]:
    """Tensors under Hugging Face names, the file's info, and its ModelConfig. By default every tensor is
    dequantised to float32; with ``native`` the matrices of a type with a kernel (``quant.TYPES``) stay in their
    blocks (``models/quant.py``'s layout) and a matrix of a quantised type without one is refused, never silently
    widened."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PonderError(f"GGUF file {p} does not exist" if not p.exists() else f"{p} is not a file")
    r = _reader(p)
    fields = read_fields(r)
    names = {t.name: t for t in r.tensors}
    emb = names.get("token_embd.weight")
    if emb is None:
        raise PonderError(f"{p} has no token_embd.weight tensor; is it a language model GGUF?")
    cfg = config_from_fields(fields, n_vocab=int(emb.shape[-1]))
    arch = fields["general.architecture"]

    def keep(t: Any) -> bool:
        return native and len(t.shape) == 2 and t.tensor_type.name in quant.TYPES

    if native:
        for t in r.tensors:
            if len(t.shape) == 2 and t.tensor_type.name not in quant.TYPES + FLOAT_TYPES:
                raise PonderError(f"{p}: tensor {t.name} is {t.tensor_type.name}, which has no native kernel "
                                  f"(kernels: {', '.join(quant.TYPES)}); run it with --weights float32 to "
                                  "dequantise it")
    need = sum(int(t.n_bytes) if keep(t) else int(np.prod(t.shape)) * 4 for t in r.tensors)
    check_memory(need, str(p))
    counts: dict[str, int] = {}
    out: dict[str, torch.Tensor] = {}
    rope_factors = None
    for t in r.tensors:
        tname = t.tensor_type.name
        counts[tname] = counts.get(tname, 0) + 1
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml lists the fastest dimension first
        if keep(t):
            raw = np.asarray(t.data)
            if raw.size != shape[0] * shape[1] // quant.BLOCK * quant.BYTES[tname]:
                raise PonderError(f"{p}: tensor {t.name} holds {raw.size} bytes, its header says {shape} "
                                  f"{tname}; the file is corrupt")
            w = quant.from_gguf_blocks(raw.reshape(shape[0], -1), tname)
        else:
            w = _dequantised(p, t, shape)
        if t.name == "rope_freqs.weight":
            rope_factors = w
            continue
        hf = _hf_name(t.name)
        if hf is None:
            raise PonderError(f"{p}: tensor {t.name} is not part of a {arch} model ponder knows; unsupported variant")
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, cfg.num_key_value_heads)
        out[hf] = w
    cfg.tie_word_embeddings = "lm_head.weight" not in out
    cfg.attention_bias = "model.layers.0.self_attn.q_proj.bias" in out
    if rope_factors is not None:  # Llama 3.x: per-frequency divisors stored as a tensor (see ``llama3_inv_freq``)
        cfg.rope_scaling = {"rope_type": "factors", "factors": rope_factors.tolist()}
    mats = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"}
    main = max(mats, key=lambda n: counts[n]) if mats else ""
    info = GGUFInfo(p, arch, fields, counts, main)
    return out, info, cfg


def _dequantised(p: Path, t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor through the reference dequantiser, as float32 of its header's shape."""
    tname = t.tensor_type.name
    try:
        a = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise PonderError(f"{p}: tensor {t.name} has quantisation type {tname}, which ponder cannot dequantise; "
                          f"supported: {', '.join(SUPPORTED_TYPES)}") from None
    except (ValueError, IndexError) as e:
        raise PonderError(f"{p}: tensor {t.name} is truncated or corrupt ({e}); re-download the file") from None
    if a.size != int(np.prod(shape)):
        raise PonderError(f"{p}: tensor {t.name} holds {a.size} values, its header says {shape}; the file is "
                          "corrupt")
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(shape)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _hf_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("blk."):
        _, n, rest = name.split(".", 2)
        if rest in _BLOCK_NAMES:
            return f"model.layers.{int(n)}.{_BLOCK_NAMES[rest]}"
    return None


def write_gguf(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, fields: dict[str, Any],
               qtype: str = "F32") -> Path:
    """Write weights (Hugging Face names; block-quantised ones are dequantised first) as a GGUF with ``fields``'
    tokenizer and chat metadata: F32, the file llama.cpp runs in the bench's same-weights peer row, or with every
    matrix quantised to ``qtype`` (Q8_0, Q4_0, Q4_1; the gguf package's reference quantiser, llama.cpp's rounding),
    so ponder and llama.cpp can run one quantised file. Written to a temporary name and renamed, so an interrupted
    write never leaves a half file behind."""
    if qtype != "F32" and qtype not in quant.TYPES:
        raise PonderError(f"cannot write a {qtype} GGUF; choose F32 or one of {', '.join(quant.TYPES)}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part")
    arch = cfg.model_type if cfg.model_type in ("llama", "qwen2", "qwen3") else "llama"
    w = gguf.GGUFWriter(str(tmp), arch)
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for k, v in fields.items():
        if k in skip or k.startswith("GGUF.") or k.startswith(f"{fields.get('general.architecture')}."):
            continue
        _add_field(w, k, v)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    inv = {v: k for k, v in _TOP_NAMES.items()}
    block_inv = {v: k for k, v in _BLOCK_NAMES.items()}
    for k, t in state.items():
        if k in inv:
            name = inv[k]
        else:
            parts = k.split(".")
            if len(parts) < 4 or parts[0] != "model" or parts[1] != "layers":
                continue
            rest = ".".join(parts[3:])
            g = block_inv.get(rest)
            if g is None:
                continue
            name = f"blk.{int(parts[2])}.{g}"
        a = quant.dequantize(t) if quant.is_quantised(t) else t.detach().float().cpu()
        if arch == "llama" and k.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute_rows(a, cfg.num_attention_heads)
        elif arch == "llama" and k.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute_rows(a, cfg.num_key_value_heads)
        if qtype != "F32" and a.dim() == 2:
            gt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(a.contiguous().numpy(), gt), raw_dtype=gt)
        else:
            w.add_tensor(name, a.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(p)
    return p


def _add_field(w: Any, key: str, v: Any) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v) if 0 <= v < 2**32 else w.add_int64(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, (list, tuple)):
        if v and isinstance(v[0], str):
            w.add_array(key, list(v))
        elif v and isinstance(v[0], float):
            w.add_key_value(key, list(v), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif v:
            w.add_key_value(key, [int(x) for x in v], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
