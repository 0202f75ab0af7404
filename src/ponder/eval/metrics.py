"""Quality metrics on text: perplexity and bits per byte, with the policy's compute counted alongside.

bits_per_byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the text, so it compares
across tokenizers and against gzip. A BOS token is prepended when the model has one, so every token is scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.forward import Engine
from ..engine.generate import score
from ..errors import PonderError


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise PonderError(f"data file {p} not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PonderError(f"{p} is not valid UTF-8 (byte {e.start}); convert it with iconv -t utf-8") from None
    if not text.strip():
        raise PonderError(f"data file {p} is empty")
    return text


def text_ids(engine: Engine, text: str) -> list[int]:
    if engine.tokenizer is None:
        raise PonderError("this model has no tokenizer; pass token ids instead of text")
    ids = engine.tokenizer.encode(text)
    bos = engine.cfg.bos_token_id
    return ([bos] if bos is not None else []) + ids


def evaluate_text(engine: Engine, text: str, policy: Any = None, window: int | None = None,
                  stride: int | None = None, max_tokens: int | None = None,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    ids = text_ids(engine, text)
    nbytes = len(text.encode("utf-8"))
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        nbytes = len(engine.tokenizer.decode(ids[1:] if engine.cfg.bos_token_id is not None else ids).encode())
    stats = engine.new_stats(record_tokens=False)
    pf = (lambda: policy.planner(engine)) if policy is not None else None
    res = score(engine, ids, window, stride, pf, stats, progress=progress)
    nll = res.nll
    return {
        "perplexity": math.exp(nll / res.tokens_scored),
        "bits_per_byte": nll / math.log(2) / nbytes,
        "nll_nats": nll,
        "tokens_scored": res.tokens_scored,
        "bytes": nbytes,
        "flops_fraction": stats.flops_fraction,
        "logprobs": res.logprobs,
        "stats": stats.summary(),
    }
