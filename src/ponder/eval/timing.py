"""Paired, interleaved wall-clock timing: the only kind of speedup ponder prints.

Rules, each one a mistake seen in public benchmarks:
- the candidates run in the same process on the same weights, alternating A/B/A/B (and rotating who goes first each
  round), so drift in clock speed, caches or a neighbour's load hits every candidate alike;
- warm-up rounds are run and thrown away (allocator, kernel selection, lazy initialisation);
- every round is repeated, and the median is reported with the min and max beside it, never the best case alone;
- on a GPU, the device is synchronised before the clock starts and before it stops.

A timed function may return a float: the seconds of the part it measured itself (e.g. the decode loop of a
generate call); otherwise the wall time of the whole call counts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device | str | None = None) -> None:
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(dev if dev is not None and dev.type == "cuda" else None)


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": [round(s, 7) for s in samples]}


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, float, Any]:
    """(measured seconds, wall seconds, result) of one synchronised call; a float result is the measured time."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    return (float(out) if isinstance(out, float) else dt), dt, out


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 1, repeats: int = 5,
                device: torch.device | str | None = None, min_seconds: float = 0.0,
                max_repeats: int | None = None) -> dict[str, dict[str, Any]]:
    """Time several callables round-robin: returns {name: {median, min, max, samples}} in seconds.

    Each round runs every function once, starting from a different one each round. ``warmup`` rounds are
    discarded. After ``repeats`` rounds, more are added (up to ``max_repeats``) until every function has run
    for ``min_seconds`` of wall time, so very fast functions still get a stable median.
    """
    if not fns:
        raise ValueError("nothing to time")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    wall = dict.fromkeys(names, 0.0)
    cap = max(repeats, max_repeats or repeats)
    r = 0
    while True:
        k = r % len(names)
        order = names[k:] + names[:k]
        for n in order:
            dt, w, _ = time_call(fns[n], device)
            if r >= warmup:
                samples[n].append(dt)
                wall[n] += w
        r += 1
        done = r - warmup
        if done >= repeats and (min(wall.values()) >= min_seconds or done >= cap):
            break
    return {n: summarize(s) for n, s in samples.items()}


def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    """Speedup num/den of two timing summaries (medians); None when either is missing or zero."""
    if not num or not den or not den.get("median") or num.get("median") is None:
        return None
    return num["median"] / den["median"]


def paired_ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> dict[str, float] | None:
    """Median, min and max of the per-round ratios num_i/den_i (rounds are paired, so drift largely cancels)."""
    if not num or not den:
        return None
    rs = [a / b for a, b in zip(num["samples"], den["samples"]) if b > 0]
    if not rs:
        return None
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
