"""Token reduction as small pure tensor functions, kept apart from the forward pass (as ToMe keeps merge.py apart
from its model patches).

Every function works on a padded batch (B, n, ...) where rows may hold different numbers of live tokens. Removing
tokens *compacts* each row (kept tokens first, in order) and cuts the batch to the longest row's kept count, so the
next layer's matrices really are smaller; the shorter rows get padding that the attention bias masks out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compaction(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Plan a compaction of (B, n) rows. Returns (order (B, m): old row of each new row, new validity (B, m) or
    None when every new row is live, old_to_new (B, n): new row of each kept old row, -1 for removed ones)."""
    B, n = keep.shape
    if B == 1:  # one row: no padding can appear, the kept indices are the order
        order = keep[0].nonzero().T
        o2n = keep.long().cumsum(1) - 1
        return order, None, o2n.masked_fill_(~keep, -1)
    counts = keep.sum(1)
    m = int(counts.max()) if B else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]
    ar = torch.arange(m, device=keep.device)
    new_valid = ar[None, :] < counts[:, None]
    old_to_new = torch.full((B, n), -1, dtype=torch.long, device=keep.device)
    old_to_new.scatter_(1, order, ar.expand(B, m).contiguous())
    old_to_new.masked_fill_(~keep, -1)
    return order, (None if bool(new_valid.all()) else new_valid), old_to_new


def gather_rows(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, n, ...) -> (B, m, ...) rows picked by order (B, m)."""
    if t.dim() == 2:
        return t.gather(1, order)
    return t.gather(1, order[..., None].expand(-1, -1, *t.shape[2:]))


def remap(slot: torch.Tensor, old_to_new: torch.Tensor) -> torch.Tensor:
    """Follow original positions (B, T0) through a compaction; retired positions (-1) stay -1."""
    out = old_to_new.gather(1, slot.clamp_min(0))
    return out.masked_fill_(slot < 0, -1)


def keep_top(score: torch.Tensor, eligible: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Per row, the ``n_keep`` (B,) highest-scoring eligible rows; returns a (B, n) mask of them."""
    s = score.masked_fill(~eligible, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    top = torch.arange(s.shape[1], device=s.device)[None, :] < n_keep[:, None]
    return torch.zeros_like(eligible).scatter_(1, order, top) & eligible


def bipartite_soft_matching(metric: torch.Tensor, mergeable: torch.Tensor, r: torch.Tensor,
                            threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching with per-row merge counts.

    Rows alternate between set A (even) and set B (odd); each A row proposes its most similar B row (cosine of
    ``metric``); the ``r[b]`` best proposals of row b are merged. ``mergeable`` (B, n) excludes padding and
    protected rows ([CLS]/[SEP]) on both sides. With ``threshold`` only proposals with a cosine above it merge (DyMU's
    dynamic merging: a redundant text merges more, a dense one less). Returns (merged (B, n) bool: the A rows that
    disappear, dst (B, n) long: the row each row now lives in - itself unless merged).
    """
    B, n, _ = metric.shape
    m = F.normalize(metric, dim=-1, eps=1e-6)
    a, b = m[:, ::2], m[:, 1::2]
    ok_a, ok_b = mergeable[:, ::2], mergeable[:, 1::2]
    scores = a @ b.transpose(1, 2)
    scores = scores.masked_fill(~ok_b[:, None, :], float("-inf"))
    node_max, node_idx = scores.max(dim=-1)  # (B, nA)
    node_max = node_max.masked_fill(~ok_a, float("-inf"))
    eligible = ok_a & torch.isfinite(node_max)
    if threshold is not None:
        eligible &= node_max > threshold
    chosen = keep_top(node_max, eligible, r)  # (B, nA)
    dst = torch.arange(n, device=metric.device).expand(B, n).clone()
    dst[:, ::2] = torch.where(chosen, 2 * node_idx + 1, dst[:, ::2])
    merged = torch.zeros(B, n, dtype=torch.bool, device=metric.device)
    merged[:, ::2] = chosen
    return merged, dst


def merge_wavg(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every merged row into its destination. x (B, n, D), size (B, n)."""
    w = size * merged  # only merged rows contribute to another row
    tot = size.scatter_add(1, dst, w)  # (the merged rows' own entries are left stale: they are dropped next)
    xsum = (x * size[..., None]).scatter_add_(1, dst[..., None].expand_as(x), x * w[..., None])
    return xsum.div_(tot.clamp_min(1e-6)[..., None]), tot
