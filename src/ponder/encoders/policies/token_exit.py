"""Per-token early exit (DToP-style): a token whose state stopped changing is frozen and leaves the computation.

After each layer from ``start`` on, a token whose state stopped changing (cosine above ``threshold``) is frozen.
"Its state" is, with ``criterion="predicted"`` (default), its predicted last-layer state: the calibrated affine map
of its current state (see ``EncoderEngine.extrapolators``), compared with the prediction from the previous layer -
a training-free stand-in for DToP's auxiliary heads; with ``criterion="state"`` it is the raw hidden state,
cos(x_l, x_{l-1}). A frozen token no longer runs as a query nor through the FFN, but its frozen state is still a key and
value for every later layer (each later layer projects K/V for it: 1/6 of a token-layer's projection work), so the
live tokens keep their full context. Its frozen state is its final state for pooling, or, with ``rejoin=k``, it
re-enters as a live token for the last k layers (it skipped only middle layers). [CLS] and [SEP] never exit.
``threshold`` is fitted to the budget on the calibration split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...errors import PonderError
from ..engine import ReducerBase
from .base import EncoderPolicy
from .registry import register


@register
@dataclass
class TokenExit(EncoderPolicy):
    """Freeze a token once cos(x_l, x_{l-1}) > threshold; frozen tokens stay keys/values (DToP-style)."""

    name: ClassVar[str] = "token-exit"
    knob_name: ClassVar[str] = "threshold"
    knob_range: ClassVar[tuple] = (-1.0, 1.0, True, 11)
    start: int = 1  # first layer after which a token may exit
    pool: str = "linear"  # linear | frozen: how a frozen state enters pooling
    criterion: str = "predicted"  # predicted | state: what must stop changing
    rejoin: int = 0  # the last `rejoin` layers run on every token again (frozen ones re-enter)
    threshold: float | None = None  # None: fitted to the budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("linear", "frozen"):
            raise PonderError(f"token-exit pool must be 'linear' or 'frozen', not {self.pool!r}")
        if self.criterion not in ("predicted", "state"):
            raise PonderError(f"token-exit criterion must be 'predicted' or 'state', not {self.criterion!r}")

    def reducer(self, engine):
        if self.knob() is None:
            return None
        L = engine.cfg.num_hidden_layers
        if not 0 <= self.rejoin < L - 1:
            raise PonderError(f"token-exit rejoin must be in 0..{L - 2}, not {self.rejoin}")
        maps = self.linear_maps(engine) if self.pool == "linear" or self.criterion == "predicted" else None
        return _Exit(self, L, maps if self.pool == "linear" and not self.rejoin else None,
                     maps if self.criterion == "predicted" else None)


class _Exit(ReducerBase):
    def __init__(self, pol: TokenExit, L: int, maps: dict | None, predictors: dict | None):
        self.pol, self.L, self.maps, self.pred = pol, L, maps, predictors

    def rejoin(self, i: int) -> bool:
        return bool(self.pol.rejoin) and i == self.L - self.pol.rejoin

    def after(self, i, st, x_in, stats) -> None:
        if i >= self.L - 1 - self.pol.rejoin:  # freezing after this would save nothing
            return
        if self.pred is not None:  # compare predicted last-layer states of this layer and the previous one
            if i < self.pol.start - 1:
                return
            A, b = self.pred[2 * i + 1]
            cur = torch.addmm(b, st.x.reshape(-1, st.x.shape[-1]), A).view_as(st.x)
            prev = st.rows.get("pred")
            st.rows["pred"] = cur
            if stats is not None:
                stats.add_overhead(2.0 * st.x.shape[0] * st.x.shape[1] * A.numel())
            if prev is None or i < self.pol.start:
                return
            cos = F.cosine_similarity(cur, prev, dim=-1)
        else:
            if i < self.pol.start or x_in is None:
                return
            cos = F.cosine_similarity(st.x, x_in, dim=-1)
        if stats is not None:
            stats.add_overhead(6.0 * cos.numel() * st.x.shape[-1])
        frozen = (cos > self.pol.threshold) & st.live & ~st.special
        if bool(frozen.any()):
            st.freeze_rows(frozen)
