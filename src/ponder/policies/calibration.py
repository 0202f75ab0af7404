"""Calibration text for policies that fit thresholds or choose layers (here, beside them: policies never import
evaluation code; the bench and the CLI take it from here).

Shipped with ponder (``data/calib.txt``: validation documents of the training corpus). Never the evaluation data:
fitting on the text you report would flatter every policy.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.forward import Engine

CALIB_TOKENS = 4096


def calib_path() -> Path:
    here = Path(__file__).resolve()
    for p in (here.parents[3] / "data" / "calib.txt", here.parents[1] / "_data" / "calib.txt"):
        if p.is_file():
            return p
    raise FileNotFoundError("data/calib.txt")


def calibration_ids(engine: Engine, n_tokens: int = CALIB_TOKENS, seq: int | None = None) -> list[list[int]]:
    """Sequences of the model's context length (at most 256) cut from the calibration text."""
    if engine.tokenizer is None:
        return []
    ids = engine.tokenizer.encode(calib_path().read_text())[:n_tokens]
    seq = seq or min(256, engine.cfg.max_position_embeddings)
    return [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
