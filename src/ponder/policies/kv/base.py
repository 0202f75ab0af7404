"""The KV-selection interface: a budget of kept prompt tokens, a score per cached slot, and the shared selection.

Why score-then-keep per layer, right after the layer ran: the scores most methods use (attention of some queries)
exist only then, and cutting layer i before layer i+1 runs means one layer's full-length K/V is all that is ever
held beyond the budget (the peak memory really drops). Everything here is a pure function of the layer's queries
and keys, apart from ``KVPlanner``, the piece the engine calls.

What a KV policy saves is declared in ``saves``: a cut at prefill makes every later decode step read fewer K/V
bytes and frees their memory; it does not make prefill cheaper (the prompt is computed in full first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ...engine.forward import Engine, PlannerBase, StepContext
from ...engine.generate import GenerationResult, SamplingConfig, generate
from ...engine.stats import Stats
from ...errors import PonderError

NEG = float("-inf")
PROTECT = 1e6  # above every score a method computes, and exact in float32 with a column added (T < 2**23)


@dataclass
class KVPolicy:
    """``budget``: the fraction of each prompt's tokens whose K/V every layer keeps, in (0, 1]; ``tokens``: a token
    budget instead (when > 0). The cut happens once, when the prompt is prefilled; generated tokens are added."""

    budget: float = 1.0
    tokens: int = 0

    name: ClassVar[str] = "kv-base"
    saves: ClassVar[tuple[str, ...]] = ("decode", "memory")
    scores_from: ClassVar[str] = "attention"  # what the score reads: "attention" (recomputed queries), "keys", "none"
    fan_out: ClassVar[bool] = True  # it only cuts the cache (the prefill's states are dense's): benches may share one
    decodes: ClassVar[bool] = False  # it decides at one-token steps too (benches feed continuations token by token)
    real: ClassVar[bool] = True  # evicted slots are freed and never read
    kv_compatible: ClassVar[bool] = True
    batch_compatible: ClassVar[bool] = True
    training_free: ClassVar[bool] = True
    lossless: ClassVar[bool] = False

    def __post_init__(self) -> None:
        b = self.budget
        if not isinstance(b, (int, float)) or not 0 < float(b) <= 1:
            raise PonderError(f"KV budget must be a fraction of the prompt kept, in (0, 1], got {b!r}")
        self.budget = float(b)
        if not isinstance(self.tokens, int) or self.tokens < 0:
            raise PonderError(f"tokens must be a whole number of tokens to keep (0: use the budget), got "
                              f"{self.tokens!r}")
        need = self.min_tokens()
        if self.tokens and self.tokens < need:
            raise PonderError(f"{self.name} keeps {self.tokens} tokens but needs at least {need} "
                              f"({self.needs()}); raise tokens or lower those settings")

    # ---- to override -----------------------------------------------------------------------------------------
    def min_tokens(self) -> int:
        """The fewest tokens a token budget may keep (the slots the method always protects, plus one)."""
        return 1

    def needs(self) -> str:
        return "at least one token"

    def scores(self, engine: Engine, i: int, x_in: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """(B, Hk, T) importance of each cached column of layer ``i`` (higher is kept first); T = ctx.end."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------
    @classmethod
    def flags(cls) -> dict[str, Any]:
        return {"real": cls.real, "kv_compatible": cls.kv_compatible, "batch_compatible": cls.batch_compatible,
                "training_free": cls.training_free, "lossless": cls.lossless, "saves": list(cls.saves)}

    def kept(self, n: int) -> int:
        """Tokens kept of a prompt of ``n`` tokens."""
        return min(n, self.tokens) if self.tokens else min(n, max(1, math.ceil(self.budget * n - 1e-9)))

    def planner(self, engine: Engine) -> KVPlanner | None:
        if self.budget >= 1.0 and not self.tokens:
            return None  # keeps everything: the dense path itself
        return KVPlanner(self, engine)

    def generate(self, engine: Engine, prompts: list[list[int]], sc: SamplingConfig, stats: Stats | None = None,
                 on_token=None) -> GenerationResult:
        return generate(engine, prompts, sc, lambda: self.planner(engine), stats, on_token,
                        shrinking=self.shrinks)

    @property
    def shrinks(self) -> bool:
        """Whether it cuts the cache (it needs a ``ShrinkingCache``); a prefill-only or read-only method does not."""
        return "memory" in self.saves

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> dict[str, Any]:
        return {"kv_policy": self.name, **self.params(), **self.flags()}


class KVPlanner(PlannerBase):
    """Cuts every layer once, when the prompt is prefilled (the first step of a shrinking cache); decode steps and
    later chunks only append."""

    def __init__(self, policy: KVPolicy, engine: Engine):
        self.policy, self.engine = policy, engine
        self._keep: tuple[torch.Tensor, int] | None = None

    def kept(self, n: int) -> int:
        """Full-precision slots kept of a prompt of ``n`` tokens."""
        return self.policy.kept(n)

    def scores(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.policy.scores(self.engine, i, x_in, ctx)

    def cut(self, s: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, n: int, real: torch.Tensor) -> tuple:
        """What ``ShrinkingCache.keep`` takes for one layer, from its scores."""
        return select(s, valid, keep, n), keep

    def evict(self, i: int, x_in: torch.Tensor, ctx: StepContext) -> tuple | None:
        if ctx.start != 0 or ctx.phase != "prefill":
            return None
        cache = ctx.cache
        real = ctx.end - cache.pad
        if i == 0:
            keep = torch.tensor([self.kept(r) for r in real.tolist()], device=cache.pad.device)
            self._keep = None if bool((keep >= real).all()) else (keep, int(keep.max()))
        if self._keep is None:
            return None
        keep, n = self._keep
        return self.cut(self.scores(i, x_in, ctx), cache.valid[:, :ctx.end], keep, n, real)


def select(scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` slots (B, Hk, n) each (row, KV head) stores: row b's ``keep[b]`` best-scoring valid columns, in
    column order, after ``n - keep[b]`` fillers (masked by the cache). Scores (B, Hk, T); padding never wins."""
    T = scores.shape[-1]
    s = scores.float().masked_fill(~valid[:, None, :], NEG)
    top = s.sort(dim=-1, descending=True, stable=True).indices[..., :n]  # ties (pooled scores) go to the earlier token,
    # the same one in a batch as alone
    real = torch.arange(n, device=s.device)[None, None, :] < keep[:, None, None]
    order = torch.where(real, top + T, top).sort(-1).values  # fillers first, then the kept in column order
    return torch.where(order >= T, order - T, order)


def protect_first(s: torch.Tensor, ctx: StepContext, count: int) -> torch.Tensor:
    """Lift each row's first ``count`` real tokens (attention sinks) above every score, earlier ones highest."""
    if count <= 0:
        return s
    T = s.shape[-1]
    rel = torch.arange(T, device=s.device)[None, :] - ctx.cache.pad[:, None]  # (B, T) index among real tokens
    sink = (rel >= 0) & (rel < count)
    return torch.where(sink[:, None, :], PROTECT * 2 - rel[:, None, :].float(), s)


def protect_last(s: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Lift the last ``count`` columns (an observation window, the recent tokens; an int, or one count per row)
    above every score, later ones highest (a budget smaller than the window keeps its most recent part)."""
    B, _, T = s.shape
    c = torch.as_tensor(count, device=s.device).expand(B)
    col = torch.arange(T, device=s.device)
    last = col[None, :] >= T - c[:, None]  # (B, T)
    return torch.where(last[:, None, :], PROTECT + col.float()[None, None, :], s)


def window_attention(engine: Engine, i: int, x_in: torch.Tensor, ctx: StepContext, window: int,
                     chunk: int = 256) -> torch.Tensor:
    """Attention probabilities of the last ``window`` queries over layer ``i``'s cached keys, averaged over those
    queries (padding queries excluded) and over each KV head's query group: (B, Hk, T). With ``window`` = T this is
    H2O's accumulated attention (a mean, so every row weighs alike), computed ``chunk`` queries at a time so an 8k
    prompt never holds a T x T matrix."""
    cache, T = ctx.cache, ctx.end
    B, Hk, hd = x_in.shape[0], engine.cfg.num_key_value_heads, engine.cfg.head_dim
    k = cache.k[i][:, :, :T]
    valid = cache.valid[:, :T]
    w = min(window, T)
    acc = torch.zeros(B, Hk, T, dtype=torch.float32, device=k.device)
    seen = torch.zeros(B, dtype=torch.float32, device=k.device)
    kcol = torch.arange(T, device=k.device)
    for a in range(T - w, T, chunk):
        b = min(a + chunk, T)
        q = engine.queries(i, x_in[:, a:b], ctx.positions[:, a:b])  # (B, H, n, hd)
        n, G = b - a, q.shape[1] // Hk
        s = torch.matmul(q.reshape(B, Hk, G * n, hd), k.transpose(-1, -2)).view(B, Hk, G, n, T) * hd ** -0.5
        qcol = kcol[a:b]
        ok = valid[:, None, :] & (kcol[None, None, :] <= qcol[None, :, None]) | (kcol[None, None, :]
                                                                                  == qcol[None, :, None])
        p = s.float().masked_fill(~ok[:, None, None], NEG).softmax(-1)  # (B, Hk, G, n, T)
        qv = valid[:, a:b].float()  # padding queries count for nothing
        acc += (p * qv[:, None, None, :, None]).sum(3).mean(2)
        seen += qv.sum(1)
    return acc / seen.clamp_min(1)[:, None, None]
