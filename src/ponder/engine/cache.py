"""A preallocated KV cache for a batch of left-padded sequences.

Left padding puts every row's newest token in the same column, so a decode step writes one column for the whole
batch with a slice and needs no per-row bookkeeping. A row's position (for rotary embeddings) is its column minus its
pad count. Layers that let some tokens leave no K/V (``kv="none"``) get their own validity mask; all other layers
share the base mask, so a dense model pays for exactly one mask.
"""

from __future__ import annotations

import torch

from ..errors import PonderError
from ..models.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # not padding
        self.holes: dict[int, torch.Tensor] = {}  # layer -> its own validity, where tokens left no K/V
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.padded = False  # any row has left padding (python flag: lets the dense path skip masks)
        self.length = 0
        self.max_len = max_len
        self.batch = batch

    def reserve(self, n: int) -> tuple[int, int]:
        """Claim the next ``n`` columns; returns (start, end)."""
        s, e = self.length, self.length + n
        if e > self.max_len:
            raise PonderError(f"sequence would reach {e} tokens but the cache holds {self.max_len}; "
                              "shorten the prompt or lower --max-new-tokens")
        new = torch.arange(s, e, device=self.valid.device)[None, :] >= self.pad[:, None]
        self.valid[:, s:e] = new
        for m in self.holes.values():
            m[:, s:e] = new
        self.length = e
        return s, e

    def set_padding(self, pad: torch.Tensor) -> None:
        """Row b's first ``pad[b]`` columns are padding (call before the prompt is written)."""
        self.pad = pad.to(self.valid.device)
        cols = torch.arange(self.max_len, device=self.valid.device)
        self.valid &= cols[None, :] >= self.pad[:, None]
        self.padded = bool((pad > 0).any())

    def layer_valid(self, layer: int) -> torch.Tensor:
        return self.holes.get(layer, self.valid)

    def _holes(self, layer: int) -> torch.Tensor:
        """The layer's own validity mask, created from the base mask on its first hole."""
        m = self.holes.get(layer)
        if m is None:
            m = self.holes[layer] = self.valid.clone()
        return m

    def punch(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Mark (row, col) slots of one layer as empty: those tokens left no K/V there."""
        self._holes(layer)[rows, cols] = False

    def punch_columns(self, layer: int, start: int, end: int) -> None:
        """Mark every row's slots in columns [start, end) of one layer empty (a step that skipped the layer)."""
        self._holes(layer)[:, start:end] = False

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (rejected speculative tokens); their slots are rewritten later."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def positions(self, start: int, end: int) -> torch.Tensor:
        cols = torch.arange(start, end, device=self.valid.device)
        return (cols[None, :] - self.pad[:, None]).clamp_min(0)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
