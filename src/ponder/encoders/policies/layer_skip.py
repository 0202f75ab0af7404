"""Static layer skipping: the baseline every token-level policy has to beat.

The budget fixes how many layers run (each layer is 1/L of the dense FLOPs); which ones is chosen greedily on the
calibration split (repeatedly drop the layer whose removal keeps the embeddings closest to dense), unless
``skip_layers`` names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import PonderError
from ..engine import ReducerBase
from ..run import encode_ids
from .base import EncoderPolicy, layer_tuple
from .registry import register


@register
@dataclass
class LayerSkip(EncoderPolicy):
    """Skip whole layers (static); which ones is chosen greedily on calibration text."""

    name: ClassVar[str] = "layer-skip"
    knob_name: ClassVar[str] = "skip_layers"
    skip_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.skip_layers = layer_tuple(self.skip_layers)

    def calibrate(self, engine, seqs) -> None:  # type: ignore[override]
        if self.skip_layers is not None:
            return
        L = engine.cfg.num_hidden_layers
        n_skip = L - max(1, math.floor(self.budget * L + 1e-9))
        if n_skip <= 0:
            self.skip_layers = ()
            return
        if not seqs:
            raise PonderError("the encoder calibration split (data/retrieval/calib.jsonl) is missing")
        seqs = seqs[:48]
        ref = encode_ids(engine, seqs)
        chosen: list[int] = []
        for _ in range(n_skip):
            best, best_cos = -1, -2.0
            for c in range(L):
                if c in chosen:
                    continue
                self.skip_layers = tuple(sorted(chosen + [c]))
                cos = torch.nn.functional.cosine_similarity(encode_ids(engine, seqs, self), ref, dim=-1).mean()
                if float(cos) > best_cos:
                    best, best_cos = c, float(cos)
            chosen.append(best)
        self.skip_layers = tuple(sorted(chosen))
        self.calibration = {"skip_layers": list(self.skip_layers), "calib_mean_cos": round(best_cos, 5)}

    def reducer(self, engine):
        if not self.skip_layers:
            if self.skip_layers is None and self.budget < 1.0:
                raise PonderError("layer-skip is not calibrated; call calibrate() (ponder.embed does it)")
            return None
        L = engine.cfg.num_hidden_layers
        if any(not 0 <= i < L for i in self.skip_layers):
            raise PonderError(f"layer-skip layers {self.skip_layers} outside 0..{L - 1}")
        return _Skip(set(self.skip_layers))


class _Skip(ReducerBase):
    def __init__(self, skip: set[int]):
        self.skip_set = skip

    def skip(self, i: int) -> bool:
        return i in self.skip_set
