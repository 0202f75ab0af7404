"""BERT-family encoder configuration: ``config.json``'s fields and sentence-transformers' pooling settings.

``EncoderConfig`` also carries the analytic cost (FLOPs per token per layer) the encoder counters and budgets use.
The module definition is :mod:`.bert`; reading a folder into it, :mod:`.bert_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from ..errors import PonderError

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
