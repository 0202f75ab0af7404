"""Model configuration read from a Hugging Face ``config.json``.

Only the fields the runtime needs are kept, normalised across the families we support, so the rest of ponder never
looks at family-specific spellings (``qkv_bias`` for Qwen2, ``q/k norm`` for Qwen3, Llama 3.x rope scaling).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PonderError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise PonderError(
                f"unsupported model_type {mt!r}; ponder supports decoder checkpoints of type "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            rope_scaling = d.get("rope_scaling") or None
            rope_theta = d.get("rope_theta")
            if rope_theta is None and isinstance(d.get("rope_parameters"), dict):  # transformers >= 5 spelling
                rp = d["rope_parameters"]
                rope_theta = rp.get("rope_theta")
                if rp.get("rope_type", "default") != "default":
                    rope_scaling = rp
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", mt == "qwen2")),
                qk_norm=mt == "qwen3",
                model_type=mt,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_list,
                sliding_window=d.get("sliding_window") if d.get("use_sliding_window", mt == "mistral") else None,
            )
        except KeyError as e:
            raise PonderError(f"config.json lacks required field {e.args[0]!r}; "
                              "is this a decoder checkpoint?") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise PonderError(f"{p} not found; a checkpoint folder needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PonderError(f"{p} is not valid JSON ({e}); re-export the checkpoint") from None
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json ponder writes for checkpoints it trains (loadable by transformers' Auto classes)."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
        }
        return d

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- analytic cost model (per token), used by stats and budgets ---------------------------------------------
    @property
    def attn_proj_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        return d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)

    @property
    def kv_proj_params(self) -> int:
        return 2 * self.hidden_size * self.head_dim * self.num_key_value_heads

    @property
    def ffn_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def attn_core_flops(self, context: int) -> int:
        """QK^T and AV for one query against ``context`` keys."""
        return 4 * self.num_attention_heads * self.head_dim * context


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3.x ("llama3") and linear rope scaling applied as transformers does."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling
    if not rs:
        return inv.float()
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / float(rs["factor"])).float()
    if kind == "factors":  # a GGUF's rope_freqs tensor: llama.cpp's per-frequency divisors (Llama 3.x)
        f = torch.tensor(rs["factors"], dtype=torch.float64)
        if f.numel() != inv.numel():
            raise PonderError(f"rope_freqs has {f.numel()} factors, the head needs {inv.numel()}; corrupt file")
        return (inv / f).float()
    if kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old_ctx / wl - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wl >= high_wl) & (wl <= low_wl)
        return torch.where(medium, smoothed, out).float()
    raise PonderError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, factors")
