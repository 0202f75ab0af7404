"""Running an encoder engine over texts and token ids: tokenizing, length-sorted batches, the calibration split.

Below the encoder policies (they calibrate through these) and above the engine, so the package's imports flow
one way: reduce <- engine <- run <- policies <- api <- bench, report <- cli.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import PonderError
from .engine import EncoderEngine, EncoderStats
from .retrieval import calib_texts

if TYPE_CHECKING:  # the type only: policies sit above this module
    from .policies.base import EncoderPolicy

DEFAULT_BATCH = 32


class TruncationWarning(UserWarning):
    """A text was longer than the model's limit and was cut (pass truncate=False to refuse instead)."""


def check_texts(texts: Sequence[str], where: Callable[[int], str] = lambda i: f"text {i + 1}") -> None:
    """Empty or whitespace-only texts are refused: they have no content to embed and usually mean a bad split."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PonderError(f"{where(i)} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise PonderError(f"{where(i)} is empty; remove empty texts (ponder embeds one non-empty text per item)")


def tokenize(engine: EncoderEngine, texts: Sequence[str], truncate: bool = True,
             where: Callable[[int], str] = lambda i: f"text {i + 1}") -> tuple[list[list[int]], list[int]]:
    """Token ids (special tokens included) and the indices of truncated texts; refuses long texts unless
    ``truncate``."""
    ids, cut = engine.tokenizer.encode_special(list(texts))
    over = [i for i, c in enumerate(cut) if c]
    if over and not truncate:
        raise PonderError(f"{where(over[0])} is longer than the model's {engine.tokenizer.max_length}-token limit; "
                          "shorten it, or allow truncation (drop --no-truncate)")
    return ids, over


def encode_ids(engine: EncoderEngine, seqs: list[list[int]], policy: EncoderPolicy | None = None,
               batch_size: int = DEFAULT_BATCH, stats: EncoderStats | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Embed token sequences in length-sorted batches (little padding), returned in the input order."""
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


def calibration_seqs(engine: EncoderEngine, n: int = 128) -> list[list[int]]:
    """Token ids of the calibration split (data/retrieval/calib.jsonl: held apart from the bench passages)."""
    texts = calib_texts()[:n]
    return tokenize(engine, texts)[0] if texts else []


