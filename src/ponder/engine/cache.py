"""A preallocated KV cache for a batch of left-padded sequences.

Left padding puts every row's newest token in the same column, so a decode step writes one column for the whole
batch with a slice and needs no per-row bookkeeping. A row's position (for rotary embeddings) is its column minus its
pad count. Layers that let some tokens leave no K/V (``kv="none"``) get their own validity mask; all other layers
share the base mask, so a dense model pays for exactly one mask.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

import torch

from ..errors import PonderError
from ..models.config import ModelConfig
from .lowbits import LowSlots


@dataclass
class WideHeads:
    """A layer's KV heads that keep every token when the rest of the layer is cut (RazorAttention's retrieval
    heads): their K/V (B, hw, capacity, hd) beside the layer's cut storage, written at column + ``wide_off``."""

    heads: torch.Tensor  # (hw,) KV head indices
    qheads: torch.Tensor  # the query heads they serve
    k: torch.Tensor
    v: torch.Tensor

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    shrinks = False  # a KV policy may cut it down (``ShrinkingCache``)
    pos_extra = 0  # how far a row's positions may run past its columns (tokens evicted before them)

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # not padding
        self.holes: dict[int, torch.Tensor] = {}  # layer -> its own validity, where tokens left no K/V
        self.low: dict[int, LowSlots] = {}  # layer -> its demoted tokens at low precision (a shrinking cache's)
        self.low_valid: torch.Tensor | None = None  # (B, m): which demoted slots are real, every layer alike
        self.wide: dict[int, WideHeads] = {}  # layer -> its heads that keep every token (a shrinking cache's)
        self.wide_valid: torch.Tensor | None = None  # (B, capacity) of those heads' columns, every layer alike
        self.wide_off = 0  # a wide head's column = the cache's column + this
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


_MMAP_SET = False


def release_freed_buffers() -> bool:
    """Make glibc return a freed multi-megabyte buffer to the OS at once (a fixed 1 MiB mmap threshold), once per
    process. Why: by default glibc raises its mmap threshold after the first such free, so the next buffers come
    from the heap and a cut layer's freed storage stays resident as fragments (measured at 4k tokens: a cache
    halved by a policy left the process's peak RSS unchanged; with the fixed threshold it drops by the freed KV
    bytes). False where the C library is not glibc."""
    global _MMAP_SET
    if _MMAP_SET or not sys.platform.startswith("linux"):
        return _MMAP_SET
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _MMAP_SET = bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        _MMAP_SET = False
    return _MMAP_SET


class _Layers:
    """Per-layer K or V storage, each (B, Hk, capacity, hd), allocated on first use (``torch.empty``: a page is
    only resident once a token is written to it)."""

    def __init__(self, n: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        self.t: list[torch.Tensor | None] = [None] * n
        self.shape, self.dtype, self.device = shape, dtype, device

    def __getitem__(self, i: int) -> torch.Tensor:
        t = self.t[i]
        if t is None:
            t = self.t[i] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return t

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        self.t[i] = t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.t if t is not None)


class ShrinkingCache(KVCache):
    """A cache a KV policy can cut down to the token slots it keeps, freeing the rest.

    Why per-layer tensors allocated on first use: at prefill a policy compacts layer i right after it ran, so the
    full-length K/V of only one layer exists at a time and the process's peak memory really drops by the evicted
    bytes. Kept slots keep the rotary position they were written with (K is stored rotated); a new token's position
    continues the row's original count (``shift``), as if nothing had been evicted.

    Every layer keeps the same number of slots ``n`` (the tensors stay rectangular), and each (row, KV head) its
    own set. A row of a batch that keeps fewer real tokens than ``n`` fills its first slots with masked fillers:
    the left-padding layout every other part of the engine already handles.

    Two variants of a cut keep more than the slots: ``low`` (per layer, the tokens a policy demotes, packed at a
    few bits per value, read by the attention before the slots; ``engine/lowbits.py``) and ``wide`` (per layer, KV
    heads that keep every column beside the cut, read by their own query heads). Both are laid out like the slots
    (fillers first, masked), so batches stay equal to their rows.
    """

    shrinks = True

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        release_freed_buffers()
        L, Hk, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.k = _Layers(L, (batch, Hk, max_len, hd), dtype, device)  # type: ignore[assignment]
        self.v = _Layers(L, (batch, Hk, max_len, hd), dtype, device)  # type: ignore[assignment]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.holes = {}
        self.low = {}
        self.low_valid = None
        self.wide = {}
        self.wide_valid = None
        self.wide_off = 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.shift = torch.zeros(batch, dtype=torch.long, device=device)  # position of a column = col - pad + shift
        self.padded = False
        self.length = 0
        self.max_len = max_len
        self.batch = batch
        self.layers = L
        self._pending: dict[int, torch.Tensor] = {}  # layer -> real slots kept per row, until every layer is cut
        self._pending_low: dict[int, torch.Tensor] = {}  # layer -> real slots demoted per row, likewise
        self.floor = 0  # the length right after the last cut: nothing before it can be rewritten

    def punch(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        raise PonderError("a KV-selection policy cannot be combined with a depth policy that leaves K/V holes "
                          "(kv='none'); run them separately")

    def punch_columns(self, layer: int, start: int, end: int) -> None:
        self.punch(layer, torch.empty(0), torch.empty(0))

    def truncate(self, length: int) -> None:
        if self._pending or length < self.floor:
            raise PonderError("cannot rewind a cache past the point where a KV policy cut it")
        super().truncate(length)

    def positions(self, start: int, end: int) -> torch.Tensor:
        cols = torch.arange(start, end, device=self.valid.device)
        return (cols[None, :] - self.pad[:, None]).clamp_min(0) + self.shift[:, None]

    def keep(self, layer: int, idx: torch.Tensor, real: torch.Tensor,
             demote: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
             wide: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep only the slots ``idx`` (B, Hk, n) of ``layer``, columns into [0, length) in the order they are to be
        stored; row b's last ``real[b]`` entries are the real tokens it keeps, its first ``n - real[b]`` masked
        fillers. ``demote`` = (columns (B, Hk, m), real count per row, bits, group): slots laid out the same way
        that stay at low precision instead of leaving. ``wide`` = (KV heads, their query heads): heads that keep
        every column as it is, beside the cut. The old storage is released at once; the columns, masks
        and positions switch over when every layer has been cut (``commit``), so the layers still to run in this
        step see the step as it began."""
        B, Hk, n = idx.shape
        k, v = self.k[layer], self.v[layer]
        if layer in self._pending:
            raise ValueError(f"layer {layer} was already cut in this step")
        room = self.max_len - self.length
        e = idx[..., None].expand(B, Hk, n, k.shape[-1])
        if demote is not None:
            di, dreal, bits, group = demote
            d = di[..., None].expand(*di.shape, k.shape[-1])
            self.low[layer] = LowSlots.of(k[:, :, :self.length].gather(2, d), v[:, :, :self.length].gather(2, d),
                                          bits, group)
            self._pending_low[layer] = dreal.to(self.pad.device)
        if wide is not None:
            heads, qheads = wide
            wk, wv = (t.new_empty(B, heads.numel(), self.max_len, t.shape[-1]) for t in (k, v))
            wk[:, :, :self.length], wv[:, :, :self.length] = k[:, heads, :self.length], v[:, heads, :self.length]
            self.wide[layer] = WideHeads(heads, qheads, wk, wv)
        for store, t in ((self.k, k), (self.v, v)):
            new = t.new_empty(B, Hk, n + room, t.shape[-1])
            new[:, :, :n] = t[:, :, :self.length].gather(2, e)
            store[layer] = new
        self._pending[layer] = real.to(self.pad.device)

    def commit(self) -> None:
        """Switch columns, masks and positions to the kept slots once every layer is cut (the engine calls this at
        the end of a step)."""
        if not self._pending:
            return
        if len(self._pending) != self.layers:
            raise PonderError(f"a KV policy cut {len(self._pending)} of {self.layers} layers in one step; it must "
                              "cut every layer (or none)")
        real = _same_in_every_layer(self._pending, "keep")
        if self._pending_low:
            if len(self._pending_low) != self.layers:
                raise PonderError("a KV policy that demotes tokens must demote them in every layer")
            dreal = _same_in_every_layer(self._pending_low, "demote")
            m = self.low[0].k.q.shape[2]
            self.low_valid = torch.arange(m, device=dreal.device)[None, :] >= (m - dreal)[:, None]
        n = self.k[0].shape[2] - (self.max_len - self.length)
        had = self.length - self.pad  # real tokens held per row before the cut
        nxt = had + self.shift  # the position the row's next token takes
        pad = n - real
        room = self.max_len - self.length
        if self.wide:  # their columns stay where they were: the prompt's, then the new tokens'
            self.wide_off = self.length - n
            self.wide_valid = torch.cat([self.valid[:, :self.length], self.valid.new_ones(self.batch, room)], 1)
        self.pad, self.shift = pad, nxt - real
        self.pos_extra = int(self.shift.max())
        self.length, self.max_len, self.floor = n, n + room, n
        cols = torch.arange(self.max_len, device=self.valid.device)
        self.valid = (cols[None, :] >= pad[:, None]) & (cols[None, :] < n)
        self.padded = bool((pad > 0).any())
        self._pending, self._pending_low = {}, {}

    def nbytes(self) -> int:
        return (self.k.nbytes() + self.v.nbytes()  # type: ignore[attr-defined]
                + sum(s.nbytes() for s in self.low.values()) + sum(w.nbytes() for w in self.wide.values()))


def _same_in_every_layer(counts: dict[int, torch.Tensor], what: str) -> torch.Tensor:
    first, *rest = counts.values()
    if any(not torch.equal(r, first) for r in rest):
        raise PonderError(f"a KV policy must {what} the same number of real tokens of a row in every layer")
    return first
