"""Opening a BERT-family encoder folder (sentence-transformers / HF): config.json, safetensors only,
tokenizer.json and the sentence-transformers module files, into :mod:`.bert`'s prepared weights.

Why a reader of its own: sentence-transformers folders carry pooling and normalisation in side files
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``); embeddings must equal
sentence-transformers' on the same folder, so those files decide pooling, lower-casing and the length limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import PonderError
from .bert import BertLayer, BertWeights
from .bert_config import EncoderConfig, Pooling
from .loader import read_safetensors
from .tokenizer import Tokenizer


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
