"""Peers the bench runs beside ponder on the same inputs: llama.cpp (llama-cpp-python) and transformers.

Why here and not in the bench loop: each peer is an optional extra with its own loading quirks, and a missing one
must be reported, never faked. Each wrapper takes token ids (the same ids ponder runs) and returns token ids, so
the comparison never depends on two tokenizers agreeing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import PonderError

LLAMACPP_HINT = "bash scripts/setup-peers.sh (builds llama-cpp-python from its sdist; pip install '.[peers]')"


def llamacpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


class LlamaCpp:
    """One llama.cpp context on a GGUF file, greedy, batch 1, with ponder's thread count."""

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None, logits_all: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise PonderError(f"llama.cpp is not installed; {LLAMACPP_HINT}") from None
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.threads,
                         n_threads_batch=self.threads, verbose=False, logits_all=logits_all)

    def generate(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``, from an empty cache every call (the prompt is prefilled each time,
        as ponder's generate does)."""
        self.llm.reset()
        out: list[int] = []
        for t in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) >= n:
                break
        return out

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def extend(self, ids: list[int], keep: int) -> None:
        """Forward ``ids`` on a cache cut back to ``keep`` tokens (a speculative verification step)."""
        self.llm.n_tokens = keep
        self.llm.eval(ids)


def f32_gguf_for(engine: Any, cache_dir: str | Path | None = None) -> Path:
    """An F32 GGUF of exactly the weights ``engine`` runs (written once per model, cached by content): llama.cpp's
    same-weights peer file. Needs the engine to come from a GGUF (its tokenizer metadata is copied)."""
    from ..models.gguf import write_gguf

    info = getattr(engine, "gguf", None)
    if info is None:
        raise PonderError("the llama.cpp same-weights peer needs a model opened from a GGUF file")
    state = {k: v for k, v in engine.model.state_dict().items()}
    h = hashlib.sha256()
    h.update(str(info.path.stat().st_size).encode())
    h.update(info.path.name.encode())
    h.update(str(engine.dtype).encode())
    d = Path(cache_dir or os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder")) / "gguf"
    out = d / f"{info.path.stem}-{h.hexdigest()[:12]}.F32.gguf"
    if not out.is_file():
        write_gguf(out, state, engine.cfg, info.fields)
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
