"""Low-precision K/V slots: a token a policy demotes keeps its K and V at a few bits per value instead of leaving.

Why asymmetric groups along the head dimension: one scale and one zero per ``group`` values of one token and head,
so a token's slots are quantised once, when it is demoted, from its own values alone (no statistics over other
tokens that a later token could change), and a group's outlier only costs that group its resolution. Scales and
zeros are float16 (4 bytes per group): at 4 bits and groups of 32 a value costs 0.625 bytes, 15.6% of float32.

The tolerance ``dequantise`` meets, per value: half a quantisation step (``scale / 2``) plus float16's rounding of
the group's minimum (``2**-11`` of its magnitude) — what ``tests/policies/test_mikv.py`` holds it to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


@dataclass
class Packed:
    """One tensor's values (..., hd) at ``bits`` bits: ``q`` (..., hd * bits / 8) uint8, ``scale`` and ``zero``
    (..., hd / group) float16."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero))


def quantise(t: torch.Tensor, bits: int, group: int) -> Packed:
    """``t`` (..., hd) at ``bits`` bits per value, one float16 scale and zero per ``group`` values."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    *lead, hd = t.shape
    if hd % group or group % (8 // bits):
        raise ValueError(f"a group of {group} must divide the head size {hd} and fill whole bytes at {bits} bits")
    g = t.float().reshape(*lead, hd // group, group)
    top = (1 << bits) - 1
    zero = g.amin(-1).to(torch.float16)
    scale = ((g.amax(-1) - zero.float()) / top).to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)  # a constant group: every value at its zero
    q = ((g - zero.float()[..., None]) / s[..., None]).round_().clamp_(0, top).to(torch.uint8).reshape(*lead, hd)
    per = 8 // bits
    if per > 1:  # ``per`` values to a byte, the first in the low bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=t.device)
        q = (q.view(*lead, hd // per, per) << shifts).sum(-1, dtype=torch.uint8)
    return Packed(q, scale, zero, bits, group)


def dequantise(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The values ``p`` stands for, (..., hd) in ``dtype``."""
    *lead, nb = p.q.shape
    per = 8 // p.bits
    q = p.q
    if per > 1:
        shifts = torch.arange(0, 8, p.bits, dtype=torch.uint8, device=q.device)
        q = ((q[..., None] >> shifts) & ((1 << p.bits) - 1)).reshape(*lead, nb * per)
    hd = q.shape[-1]
    g = q.view(*lead, hd // p.group, p.group).to(torch.float32)
    g = g * p.scale.float()[..., None] + p.zero.float()[..., None]
    return g.reshape(*lead, hd).to(dtype)


@dataclass
class LowSlots:
    """One layer's demoted tokens: K and V (B, Hk, m, hd) packed; the cache's ``low_valid`` (B, m) says which of
    the m slots are real (a row of a batch that demotes fewer tokens fills its first slots, as padding does)."""

    k: Packed
    v: Packed

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, bits: int, group: int) -> LowSlots:
        return cls(quantise(k, bits, group), quantise(v, bits, group))

    def values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantise(self.k, dtype), dequantise(self.v, dtype)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


def bytes_per_value(bits: int, group: int) -> float:
    """Bytes a demoted value costs, its share of the group's float16 scale and zero included."""
    return bits / 8 + 4 / group
