"""Token merging (ToMe's bipartite soft matching) with size-weighted attention and virtual unmerging for pooling.

In every merging layer, between attention and FFN, the live tokens are split alternately into sets A and B; each A
token proposes its most similar B token (cosine of the attention keys, ``metric="keys"``, or of the hidden
states, ``"hidden"``), and the ``merge_ratio`` share of a text's live tokens with the best proposals are merged
into their partners by a size-weighted average. Later attention adds log(size) to a merged token's logits
(proportional attention: it gets the attention its originals would have had). For pooling, each original position
takes its merged representative (DyMU's virtual unmerging), so the mean still runs over original positions, i.e.
it is a size-weighted mean over merged tokens. [CLS] and [SEP] are never merged. ``merge_ratio`` is fitted to the
budget (at most 0.5: bipartite matching merges at most half the tokens per layer). With ``mode="threshold"`` the
count is dynamic instead (DyMU's DToMe): every proposal with a cosine above ``threshold`` merges, so redundant texts
shrink more; the threshold is fitted to the budget on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import PonderError
from ..engine import ReducerBase
from ..reduce import bipartite_soft_matching, merge_wavg
from .base import EncoderPolicy, layer_tuple
from .registry import register


@register
@dataclass
class TokenMerge(EncoderPolicy):
    """ToMe bipartite soft matching between attention and FFN; size-weighted attention; unmerged for pooling."""

    name: ClassVar[str] = "token-merge"
    metric: str = "hidden"
    layers: tuple[int, ...] | None = None  # merging layers; None: all
    mode: str = "ratio"  # ratio: a fixed share per layer (ToMe) | threshold: every pair above a cosine (DyMU)
    merge_ratio: float | None = None  # mode=ratio: share of a text's live tokens merged per layer; None: fitted
    threshold: float | None = None  # mode=threshold: merge proposals with cosine above it; None: fitted

    @property
    def knob_name(self) -> str:  # type: ignore[override]
        return "threshold" if self.mode == "threshold" else "merge_ratio"

    @property
    def knob_range(self) -> tuple:  # type: ignore[override]
        return (-1.0, 1.0, True, 11) if self.mode == "threshold" else (0.0, 0.5, False, 9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("ratio", "threshold"):
            raise PonderError(f"token-merge mode must be 'ratio' or 'threshold', not {self.mode!r}")
        if self.metric not in ("keys", "hidden"):
            raise PonderError(f"token-merge metric must be 'keys' or 'hidden', not {self.metric!r}")
        self.layers = layer_tuple(self.layers)

    def reducer(self, engine):
        if self.knob() is None:
            return None
        L = engine.cfg.num_hidden_layers
        pts = self.layers if self.layers is not None else tuple(range(L))
        return _Merge(self, set(pts))


class _Merge(ReducerBase):
    def __init__(self, pol: TokenMerge, points: set[int]):
        self.pol, self.points = pol, points

    def mid(self, i, st, keys, probs, stats) -> None:
        if i not in self.points:
            return
        live = st.live
        thr = self.pol.threshold if self.pol.mode == "threshold" else None
        if thr is None:
            r = torch.floor(st.counts() * self.pol.merge_ratio + 1e-9).long()
            if not bool((r > 0).any()):
                return
        else:
            r = st.counts()
        metric = keys if self.pol.metric == "keys" else st.x
        merged, dst = bipartite_soft_matching(metric, live & ~st.special, r, thr)
        if stats is not None:
            n = metric.shape[1]
            stats.add_overhead(2.0 * metric.shape[0] * ((n + 1) // 2) * (n // 2) * metric.shape[2])
        if not bool(merged.any()):
            return
        size = st.size if st.size is not None else st.x.new_ones(st.x.shape[:2])
        st.x, st.size = merge_wavg(st.x, size, merged, dst)
        st.keep_rows(~merged, dst=dst)
