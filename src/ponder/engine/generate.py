"""Prefill + decode, sampling, and windowed scoring, all through ``Engine.forward``.

Generation strategies (plain here, speculative in ``speculative.py``) sit on top of the engine, as LayerSkip keeps
its strategies apart from its model slicing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..errors import PonderError
from .cache import KVCache
from .forward import Engine, ForwardOutput, Planner
from .stats import Stats


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    # None: the model's own end-of-sequence / end-of-turn tokens (``Engine.stop_tokens``), as transformers'
    # generate stops at its EOS; () never stops early.
    stop_tokens: tuple[int, ...] | None = None

    def stops(self, engine: Engine) -> set[int]:
        return set(engine.stop_tokens if self.stop_tokens is None else self.stop_tokens)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PonderError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PonderError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PonderError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PonderError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (stop token included when hit)
    finish: list[str]  # "stop" | "length"
    stats: Stats | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)


def pick(logits: torch.Tensor, sc: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from (B, V) logits."""
    if sc.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(distribution(logits, sc), 1, generator=gen).squeeze(1)


def distribution(logits: torch.Tensor, sc: SamplingConfig) -> torch.Tensor:
    """The (B, V) probabilities ``pick`` samples from (temperature > 0): speculative sampling compares two of them."""
    logits = logits.float() / sc.temperature
    if sc.top_k:
        kth = torch.topk(logits, min(sc.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sc.top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > sc.top_p  # keep the smallest prefix reaching top_p
        srt = srt.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, idx, srt)
    return logits.softmax(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    pad = torch.zeros(len(prompts), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, n - len(p):] = torch.tensor(p, dtype=torch.long)
        pad[b] = n - len(p)
    return ids.to(device), pad


def check_prompts(engine: Engine, prompts: list[list[int]], max_new: int) -> None:
    if not prompts:
        raise PonderError("no prompts given")
    ctx = engine.cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PonderError(f"prompt {i} is empty; give at least one token of text")
        if len(p) + max_new > ctx:
            raise PonderError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} that exceeds the "
                              f"model's context of {ctx}; shorten the prompt or lower --max-new-tokens")


def begin(engine: Engine, prompts: list[list[int]], sc: SamplingConfig, room: int, shrinking: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, KVCache, torch.Generator | None]:
    """Checked, left-padded prompt ids, their padding, a cache with ``room`` columns past the longest prompt (one a
    KV policy can cut down when ``shrinking``), and the sampling generator: the start every generation loop shares."""
    sc.validate()
    check_prompts(engine, prompts, sc.max_new_tokens)
    ids, pad = left_pad(prompts, 0, engine.device)
    cache = engine.new_cache(len(prompts), ids.shape[1] + room, shrinking)
    gen = torch.Generator(device="cpu").manual_seed(sc.seed) if sc.seed is not None else None
    return ids, pad, cache, gen


def prefill(engine: Engine, ids: torch.Tensor, pad: torch.Tensor, cache: KVCache, planner: Planner | None,
            stats: Stats | None) -> ForwardOutput:
    """Run the prompts into the cache: the last position's logits (padded rows masked out of attention) and every
    position's final states."""
    if ids.shape[0] > 1:
        cache.set_padding(pad)
    return engine.forward(ids, cache, planner, stats, logits="last", phase="prefill")


def emit_column(col: list[int], out: list[list[int]], done: list[bool], finish: list[str], stop: set[int],
                on_token: Callable[[int, int], None] | None) -> bool:
    """Append one new token per live row (a finished row's token is dropped), marking rows that reach a stop token;
    True when some row stopped now. Plain Python: at batch 1 each tensor call here would cost as much as a small
    layer's matmul, and every policy and dense alike would pay it."""
    stopped = False
    for b, t in enumerate(col):
        if not done[b]:
            out[b].append(t)
            if on_token is not None:
                on_token(b, t)
            if t in stop:
                finish[b], done[b], stopped = "stop", True, True
    return stopped


def generate(engine: Engine, prompts: list[list[int]], sc: SamplingConfig | None = None,
             planner_factory: Callable[[], Planner | None] | None = None, stats: Stats | None = None,
             on_token: Callable[[int, int], None] | None = None, shrinking: bool = False) -> GenerationResult:
    """Generate for a batch of token-id prompts (left-padded into one batch); ``shrinking``: on a cache the
    planner may cut down (a KV-selection policy)."""

    sc = sc or SamplingConfig()
    B = len(prompts)
    ids, pad, cache, gen = begin(engine, prompts, sc, sc.max_new_tokens, shrinking)
    planner = planner_factory() if planner_factory else None
    stop = sc.stops(engine)
    out: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = [False] * B
    done_t: torch.Tensor | None = None  # the rows that stopped, once any has (they are fed token 0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = prefill(engine, ids, pad, cache, planner, stats).logits
        t1 = time.perf_counter()
        for step in range(sc.max_new_tokens):
            nxt = pick(logits, sc, gen)
            if emit_column(nxt.tolist(), out, done, finish, stop, on_token):
                done_t = None
            if all(done) or step == sc.max_new_tokens - 1:
                break
            if any(done):
                if done_t is None:
                    done_t = torch.tensor(done, device=nxt.device)
                nxt = nxt.masked_fill(done_t, 0)
            logits = engine.forward(nxt[:, None], cache, planner, stats, logits="last", phase="decode").logits
    t2 = time.perf_counter()
    extra = {"kv_tokens": cache.length, "kv_bytes": cache.nbytes()} if shrinking else {}
    return GenerationResult(out, finish, stats, prefill_s=t1 - t0, decode_s=t2 - t1, extra=extra)


@dataclass
class ScoreResult:
    logprobs: torch.Tensor  # (n,) log p(token_j | tokens_<j) for every scored token, in order
    tokens_scored: int

    @property
    def nll(self) -> float:
        return float(-self.logprobs.double().sum())


def windows(n: int, window: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """(begin, end, first_scored): each token in [1, n) is scored exactly once, with up to ``window`` tokens of
    context; a new window starts every ``stride`` tokens (the lm-eval / HF perplexity convention)."""
    scored_to = 1
    b = 0
    while scored_to < n:
        e = min(b + window, n)
        yield b, e, scored_to
        scored_to = e
        if e == n:
            break
        b = e - (window - stride)


def score(engine: Engine, ids: list[int], window: int | None = None, stride: int | None = None,
          planner_factory: Callable[[], Planner | None] | None = None, stats: Stats | None = None,
          batch: int = 8, progress: Callable[[int], None] | None = None) -> ScoreResult:
    """Per-token log-probabilities of ``ids`` (the first token is context only; prepend BOS to score it)."""
    window = window or engine.cfg.max_position_embeddings
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise PonderError(f"stride must be in (0, window], got stride={stride} window={window}")
    if len(ids) < 2:
        raise PonderError("text too short to score: it needs at least two tokens")
    t = torch.tensor(ids, dtype=torch.long)
    wins = list(windows(len(ids), window, stride))
    pieces: list[torch.Tensor] = []
    with torch.inference_mode():
        i = 0
        while i < len(wins):
            group = [w for w in wins[i:i + batch] if (w[1] - w[0]) == (wins[i][1] - wins[i][0])]
            x = torch.stack([t[b:e] for b, e, _ in group]).to(engine.device)
            planner = planner_factory() if planner_factory else None
            lg = engine.forward(x, None, planner, stats, logits="all", phase="score").logits.float()
            lp = torch.log_softmax(lg[:, :-1], dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            for r, (b, _e, s) in enumerate(group):
                pieces.append(lp[r, s - b - 1:].cpu())
            i += len(group)
            if progress is not None:
                progress(len(group))
    lp = torch.cat(pieces)
    return ScoreResult(lp, lp.numel())
