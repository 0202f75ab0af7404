"""BERT-family encoders (BERT, MiniLM, RoBERTa-style position offsets) from sentence-transformers / HF folders.

What is here: the folder reader (config.json, safetensors only, tokenizer.json, the sentence-transformers module
files), the prepared (fused) weights, and the per-layer math as small pure functions. The token-reducing forward
pass that strings them together lives in :mod:`ponder.encoders.engine`; keeping the math apart from the
orchestration is what lets one layer function serve dense encoding, pruning, merging and early exit.

Why a reader of its own: sentence-transformers folders carry pooling and normalisation in side files
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``); embeddings must equal
sentence-transformers' on the same folder, so those files decide pooling, lower-casing and the length limit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PonderError
from .loader import read_safetensors
from .tokenizer import Tokenizer

ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
_DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi", "gemma", "mixtral")


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1 (its position table has that many extra rows)."""
        return self.pad_token_id + 1 if self.model_type in _ROBERTA_LIKE else 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.position_offset

    # ---- analytic cost (FLOPs per token per layer); used by EncoderStats and budgets ---------------------------
    @property
    def qo_flops(self) -> int:
        return 2 * 2 * self.hidden_size * self.hidden_size

    @property
    def kv_flops(self) -> int:
        return 2 * 2 * self.hidden_size * self.hidden_size

    @property
    def ffn_flops(self) -> int:
        return 2 * 2 * self.hidden_size * self.intermediate_size

    @property
    def pair_flops(self) -> int:
        """QK^T and AV for one (query, key) pair, all heads."""
        return 4 * self.hidden_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> EncoderConfig:
        mt = d.get("model_type")
        if mt in _DECODER_TYPES or any(str(a).endswith("ForCausalLM") for a in d.get("architectures") or []):
            raise PonderError(f"{where} describes a {mt} decoder, not a BERT-family encoder; ponder embed needs an "
                              "encoder folder (e.g. --model minilm)")
        if mt not in ENCODER_MODEL_TYPES:
            raise PonderError(f"{where}: unsupported encoder model_type {mt!r}; ponder embed supports "
                              f"{', '.join(ENCODER_MODEL_TYPES)}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise PonderError(f"{where}: position_embedding_type {d['position_embedding_type']!r} is not "
                              "supported; only absolute position embeddings")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise PonderError(f"{where}: unsupported hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        try:
            c = cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                    intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
                    num_attention_heads=int(d["num_attention_heads"]),
                    max_position_embeddings=int(d.get("max_position_embeddings", 512)),
                    type_vocab_size=int(d.get("type_vocab_size", 2)),
                    layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)), hidden_act=act, model_type=mt,
                    pad_token_id=int(d.get("pad_token_id") or 0))
        except KeyError as e:
            raise PonderError(f"{where} lacks required field {e.args[0]!r}; is this an encoder checkpoint?") from None
        if c.hidden_size % c.num_attention_heads:
            raise PonderError(f"{where}: hidden_size {c.hidden_size} is not divisible by num_attention_heads "
                              f"{c.num_attention_heads}")
        return c


@dataclass
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling + Normalize modules)."""

    mode: str = "mean"  # mean | cls | max | mean_sqrt_len
    normalize: bool = False
    max_seq_length: int | None = None  # sentence_bert_config.json: the length sentence-transformers truncates to
    lowercase: bool = False  # sentence_bert_config.json do_lower_case (applied to the text before tokenising)


@dataclass
class BertLayer:
    """One post-LayerNorm encoder layer; q|k|v fused so a layer is one projection, one attention, one FFN."""

    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]

    @property
    def wkv(self) -> torch.Tensor:
        return self.wqkv[self.wo.shape[0]:]

    @property
    def bkv(self) -> torch.Tensor:
        return self.bqkv[self.wo.shape[0]:]


@dataclass
class BertWeights:
    cfg: EncoderConfig
    word: torch.Tensor
    pos: torch.Tensor
    tok_type: torch.Tensor
    ln_emb: tuple[torch.Tensor, torch.Tensor]
    layers: list[BertLayer] = field(default_factory=list)


class EncoderTokenizer(Tokenizer):
    """tokenizer.json with the special tokens ([CLS] ... [SEP]) and ponder's own length limit.

    A sentence-transformers tokenizer.json often carries fixed padding and truncation (128) from its export; both
    are switched off here, and truncation is applied at the model's limit so the special tokens survive it.
    """

    def __init__(self, path: str | Path, max_length: int, lowercase: bool = False):
        super().__init__(path)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        self.lowercase = lowercase
        self._trunc: int | None = None

    def encode_special(self, texts: list[str], max_length: int | None = None
                       ) -> tuple[list[list[int]], list[bool]]:
        """Token ids with special tokens, cut to ``max_length``; and, per text, whether it was cut."""
        m = max_length or self.max_length
        if self._trunc != m:
            self._tok.enable_truncation(m)
            self._trunc = m
        encs = self._tok.encode_batch([t.lower() for t in texts] if self.lowercase else texts,
                                      add_special_tokens=True)
        return [e.ids for e in encs], [bool(e.overflowing) for e in encs]


# ---- reading a folder ---------------------------------------------------------------------------------------------
def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PonderError(f"{p} is not valid JSON ({e}); re-export the model folder") from None


def read_pooling(folder: Path) -> Pooling:
    """Pooling as sentence-transformers would build it; a bare BERT folder gets its default (mean, no norm)."""
    pool = Pooling()
    mods = folder / "modules.json"
    if mods.is_file():
        pool_dir = None
        for m in _read_json(mods):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Transformer":
                if m.get("path", "") not in ("", "."):
                    raise PonderError(f"{mods}: the Transformer module lives in {m['path']!r}; point --model at "
                                      "that sub-folder's parent layout is not supported, pass the folder itself")
            elif kind == "Pooling":
                pool_dir = folder / m.get("path", "1_Pooling")
            elif kind == "Normalize":
                pool.normalize = True
            else:
                raise PonderError(f"{mods}: sentence-transformers module {m.get('type')!r} is not supported "
                                  "(ponder embeds with Transformer, Pooling and Normalize modules only)")
        if pool_dir is not None and (pool_dir / "config.json").is_file():
            pc = _read_json(pool_dir / "config.json")
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
                     if pc.get(f"pooling_mode_{k}")]
            other = [k for k, v in pc.items() if k.startswith("pooling_mode_") and v and k[13:] not in
                     ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")]
            if len(modes) != 1 or other:
                raise PonderError(f"{pool_dir / 'config.json'}: pooling {modes + other} is not supported; ponder "
                                  "supports exactly one of cls, mean, max, mean_sqrt_len")
            pool.mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                         "mean_sqrt_len_tokens": "mean_sqrt_len"}[modes[0]]
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        d = _read_json(sb)
        pool.max_seq_length = int(d["max_seq_length"]) if d.get("max_seq_length") else None
        pool.lowercase = bool(d.get("do_lower_case", False))
    return pool


def _tensor(w: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    if key not in w:
        raise PonderError(f"{where}: tensor {key!r} is missing; the weights do not match a BERT-family encoder")
    t = w[key]
    if tuple(t.shape) != shape:
        raise PonderError(f"{where}: tensor {key} has shape {tuple(t.shape)} but config.json implies {shape}; "
                          "the config and weights belong to different models")
    return t


def build_weights(cfg: EncoderConfig, raw: dict[str, torch.Tensor], where: Path,
                  dtype: torch.dtype = torch.float32) -> BertWeights:
    # Task-head checkpoints (BertForMaskedLM, ...) prefix the encoder with "bert." / "roberta."; strip it.
    for pre in ("bert.", "roberta.", "model."):
        if any(k.startswith(pre + "embeddings.") for k in raw):
            raw = {k[len(pre):]: v for k, v in raw.items() if k.startswith(pre)}
            break
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers

    def g(k: str, *shape: int) -> torch.Tensor:
        return _tensor(raw, k, shape, where).to(dtype)

    e = "embeddings."
    W = BertWeights(cfg, word=g(e + "word_embeddings.weight", cfg.vocab_size, D),
                    pos=g(e + "position_embeddings.weight", cfg.max_position_embeddings, D),
                    tok_type=g(e + "token_type_embeddings.weight", cfg.type_vocab_size, D),
                    ln_emb=(g(e + "LayerNorm.weight", D), g(e + "LayerNorm.bias", D)))
    for i in range(L):
        p = f"encoder.layer.{i}."
        a = p + "attention."
        W.layers.append(BertLayer(
            wqkv=torch.cat([g(a + f"self.{n}.weight", D, D) for n in ("query", "key", "value")]),
            bqkv=torch.cat([g(a + f"self.{n}.bias", D) for n in ("query", "key", "value")]),
            wo=g(a + "output.dense.weight", D, D), bo=g(a + "output.dense.bias", D),
            ln1=(g(a + "output.LayerNorm.weight", D), g(a + "output.LayerNorm.bias", D)),
            w1=g(p + "intermediate.dense.weight", I, D), b1=g(p + "intermediate.dense.bias", I),
            w2=g(p + "output.dense.weight", D, I), b2=g(p + "output.dense.bias", D),
            ln2=(g(p + "output.LayerNorm.weight", D), g(p + "output.LayerNorm.bias", D)),
        ))
    if f"encoder.layer.{L}.attention.self.query.weight" in raw:
        raise PonderError(f"{where}: the weights have more layers than config.json's num_hidden_layers={L}")
    return W


@dataclass
class EncoderModel:
    """Everything needed to embed text: weights, tokenizer, pooling, and where they came from."""

    weights: BertWeights
    tokenizer: EncoderTokenizer
    pooling: Pooling
    path: Path
    name: str

    @property
    def cfg(self) -> EncoderConfig:
        return self.weights.cfg

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length


def load_encoder_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> EncoderModel:
    """Open a BERT-family encoder folder (safetensors only; a pickle-only folder is refused with a hint)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise PonderError(f"model folder {folder} does not exist; pass an encoder folder or --model minilm")
    if not folder.is_dir():
        raise PonderError(f"{folder} is a file; --model takes an encoder folder (config.json, model.safetensors, "
                          "tokenizer.json)")
    if not (folder / "config.json").is_file():
        raise PonderError(f"{folder} has no config.json; it is not a Hugging Face / sentence-transformers folder")
    cfg = EncoderConfig.from_dict(_read_json(folder / "config.json"), str(folder / "config.json"))
    pooling = read_pooling(folder)
    raw = read_safetensors(folder)
    weights = build_weights(cfg, raw, folder, dtype)
    limit = cfg.max_tokens
    max_len = min(pooling.max_seq_length or limit, limit)
    tok = EncoderTokenizer(folder / "tokenizer.json", max_len, pooling.lowercase)
    if tok.vocab_size > cfg.vocab_size:
        raise PonderError(f"{folder}: tokenizer.json has {tok.vocab_size} tokens but the model only "
                          f"{cfg.vocab_size}; they belong to different models")
    return EncoderModel(weights, tok, pooling, folder, folder.name)


# ---- the per-layer math (pure functions over prepared weights) ----------------------------------------------------
def embed_tokens(W: BertWeights, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Word + absolute position + token-type-0 embeddings, then LayerNorm. ids (B, T)."""
    cfg = W.cfg
    T = ids.shape[1]
    if cfg.position_offset:  # RoBERTa: positions count non-padding tokens, starting after the padding index
        v = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
        pos = (v.long().cumsum(1) * v.long()) + cfg.pad_token_id
        pe = F.embedding(pos, W.pos)
    else:
        pe = W.pos[:T]
    x = F.embedding(ids, W.word) + pe + W.tok_type[0]
    return F.layer_norm(x, (cfg.hidden_size,), *W.ln_emb, cfg.layer_norm_eps)


def key_bias(valid: torch.Tensor | None, size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias over keys (B, 1, 1, K): -inf on padding, log(size) for merged tokens (ToMe's
    proportional attention: a token standing for s originals gets the attention s copies would get)."""
    if valid is None and size is None:
        return None
    if size is not None:
        b = size.clamp_min(1e-6).log().to(dtype)
        if valid is not None:
            b = b.masked_fill(~valid, float("-inf"))
    else:
        b = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return b[:, None, None, :]


def split_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, n, D = t.shape
    return t.view(B, n, H, D // H).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, want_probs: bool | str
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention (B, H, n, hd) x (B, H, m, hd). With ``want_probs`` the probabilities are computed
    explicitly (a scoring layer of token pruning needs them); ``want_probs="first"`` keeps the fused kernel and
    adds only the first query's ([CLS]'s) probabilities (B, H, 1, m); otherwise the fused SDPA kernel runs alone."""
    if want_probs == "first":
        s = (q[:, :, :1] @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        p = (s + bias).softmax(-1) if bias is not None else s.softmax(-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), p
    if not want_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias
    p = s.softmax(-1)
    return p @ v, p


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, n, hd = o.shape
    return o.transpose(1, 2).reshape(B, n, H * hd)


def attn_block(W: BertWeights, i: int, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None,
               want_probs: bool | str = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Self-attention half of layer ``i`` for the query rows ``x`` (B, n, D); ``ctx`` (B, m, D) are extra rows that
    are only keys/values (frozen tokens). Returns (LN1 output for x, probs or None, keys of x (B, n, D))."""
    cfg, w = W.cfg, W.layers[i]
    H, D = cfg.num_attention_heads, cfg.hidden_size
    q, k, v = F.linear(x, w.wqkv, w.bqkv).split(D, dim=-1)
    kx = k
    if ctx is not None and ctx.shape[1]:
        kc, vc = F.linear(ctx, w.wkv, w.bkv).split(D, dim=-1)
        k, v = torch.cat([k, kc], 1), torch.cat([v, vc], 1)
    o, p = attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), bias, want_probs)
    h = F.layer_norm(x + F.linear(merge_heads(o), w.wo, w.bo), (D,), *w.ln1, cfg.layer_norm_eps)
    return h, p, kx


def ffn_block(W: BertWeights, i: int, h: torch.Tensor) -> torch.Tensor:
    cfg, w = W.cfg, W.layers[i]
    act = _ACTIVATIONS[cfg.hidden_act]
    return F.layer_norm(h + F.linear(act(F.linear(h, w.w1, w.b1)), w.w2, w.b2), (cfg.hidden_size,), *w.ln2,
                        cfg.layer_norm_eps)


def pool(tokens: torch.Tensor, weight: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers' pooling over (B, T, D) with per-position weights (B, T) (the attention mask, or
    fewer ones where a policy dropped a token from pooling)."""
    w = weight.to(tokens.dtype)
    if mode == "cls":
        out = tokens[:, 0]
    elif mode == "max":
        out = tokens.masked_fill(w[..., None] <= 0, -1e9).max(1).values
    else:
        s = (tokens * w[..., None]).sum(1)
        n = w.sum(1, keepdim=True).clamp_min(1e-9)
        out = s / (n if mode == "mean" else n.sqrt())
    return F.normalize(out, p=2, dim=1) if normalize else out
