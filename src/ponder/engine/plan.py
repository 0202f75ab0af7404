"""Execution plans: which token rows run which unit of which layer.

A plan is the only thing a policy hands the engine. Keeping it this small (two index sets and a KV rule per layer)
is what lets one forward pass serve every method and lets the engine count, rather than trust, the work done.

Token rows are flat indices into the ``B * T`` tokens of the current step, sorted ascending. ``None`` means every
row (the dense fast path, no gather); an empty tensor means no row (the unit's weights are not even read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

KVMode = Literal["compute", "none", "copy", "filled"]


class Replacement(Protocol):
    """A trained stand-in for a skipped layer's whole residual update (a healed layer drop): the update of rows
    (n, D), and its cost per row for the stats."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    def flops_per_row(self) -> float: ...


@dataclass(frozen=True)
class LayerPlan:
    """What one layer runs for one forward step.

    kv says what a row that does *not* run attention leaves in this layer's KV cache:
    ``"compute"``: K/V projected from its incoming hidden state (later tokens see a complete cache);
    ``"none"``: nothing; the slot is masked for every later query (cheapest, but later tokens lose context).
    ``"copy"``: the slot copies the previous layer's K/V for that token, no projection (early exit's "KV copying";
    layer 0 has no previous layer and leaves a hole as with ``"none"``).
    ``"filled"``: the planner has already written this layer's K/V for those rows (an exited token's K/V for every
    layer it skips, projected from its frozen state in one call: :meth:`Engine.exit_kv`); the layer adds nothing.
    """

    attn: torch.Tensor | None = None
    ffn: torch.Tensor | None = None
    kv: KVMode = "compute"
    # only with a whole-layer skip: the cheap path every row takes instead of the layer (``Replacement``)
    replace: Replacement | None = None
    # selective attention (a one-token step whose rows all run): the cache columns before this step each (row, KV
    # head) reads, (B, Hk, k), and which of them count (B, Hk, k) bool; the step's own token is always read
    keys: torch.Tensor | None = None
    keys_ok: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.replace is not None and (self.attn is None or self.ffn is None or self.attn.numel()
                                         or self.ffn.numel()):
            raise ValueError("a replacement stands in for a whole skipped layer: attn and ffn must be empty")
        if self.keys is not None and (self.attn is not None or self.keys_ok is None):
            raise ValueError("selective attention (keys) needs every row to attend, and keys_ok beside keys")

    @property
    def dense(self) -> bool:
        return self.attn is None and self.ffn is None and self.keys is None

    @staticmethod
    def skip(device: torch.device | str = "cpu", kv: KVMode = "none", replace: Replacement | None = None
             ) -> LayerPlan:
        """Skip the whole layer for every row (optionally through a trained replacement)."""
        e = torch.empty(0, dtype=torch.long, device=device)
        return LayerPlan(attn=e, ffn=e, kv=kv, replace=replace)

    @staticmethod
    def from_masks(attn: torch.Tensor | None, ffn: torch.Tensor | None, kv: KVMode = "compute") -> LayerPlan:
        """Build from boolean masks of shape (B, T) (True = run). All-True masks become the dense ``None``."""
        return LayerPlan(attn=_rows(attn), ffn=_rows(ffn), kv=kv)


def _rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    flat = mask.reshape(-1)
    idx = flat.nonzero().squeeze(1)  # one host sync per plan: the price of really shrinking the matrices
    return None if idx.numel() == flat.numel() else idx


Plan = list[LayerPlan] | None  # None: dense for every layer


def validate_kv(kv: str) -> None:
    if kv not in ("compute", "none", "copy", "filled"):
        raise ValueError(f"kv mode must be 'compute', 'none', 'copy' or 'filled', not {kv!r}")
