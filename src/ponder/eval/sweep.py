"""Append-only results files that survive interruption and refuse to mix models.

One JSON object per line, written with flush + fsync as each point finishes: Ctrl-C, a crash or a power cut loses
at most the point in flight. A rerun reads what is there and skips every point already measured with the same
settings. Nothing is ever rewritten: a half-written last line (a crash mid-write) is left in place and ignored.
A folder whose rows came from different weights is refused, since a report mixing them would compare nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import PonderError

RESULTS = "results.jsonl"
# Every bench's A/A control must read inside this band; a speedup inside it cannot be told apart from 1.0.
NOISE_BAND = (0.9, 1.1)


def parse_budgets(text: str | Iterable[float]) -> list[float]:
    """'1,0.9,0.75' -> [1.0, 0.9, 0.75]; every value must lie in (0, 1]."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out: list[float] = []
    for s in items:
        if s == "":
            continue
        try:
            b = float(s)
        except (TypeError, ValueError):
            raise PonderError(f"budget {s!r} is not a number; give a comma-separated list like 1,0.9,0.75") from None
        if not (math.isfinite(b) and 0 < b <= 1):
            raise PonderError(f"budget {s} is outside (0, 1]; a budget is the fraction of dense layer FLOPs to spend")
        if b not in out:
            out.append(b)
    if not out:
        raise PonderError("the budget list is empty; give e.g. --budgets 1,0.9,0.75")
    return out


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def point_key(row: dict[str, Any]) -> tuple:
    return (row.get("task", "lm"), row.get("policy"), round(float(row.get("budget", 1.0)), 6), row.get("settings"))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them and a report must not choke."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def read_rows(path: str | Path, warn: bool = True) -> list[dict[str, Any]]:
    """Every complete row of a results file (lines that do not parse are skipped, with a note)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS
    if not p.is_file():
        return []
    rows, bad = [], 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict):
            rows.append(r)
    if bad and warn:
        print(f"ponder: note: skipped {bad} unreadable line(s) in {p} (an interrupted write?)", file=sys.stderr)
    return rows


class ResultsFile:
    """``DIR/results.jsonl``, opened for appending points of one model."""

    def __init__(self, out_dir: str | Path, fingerprint: dict[str, Any] | None = None):
        self.dir = Path(out_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise PonderError(f"--out {self.dir} exists and is not a folder")
        self.path = self.dir / RESULTS
        self.rows = read_rows(self.path)
        self.fingerprint = fingerprint or {}
        sha = self.fingerprint.get("model_sha256")
        if sha:
            other = {r.get("model_sha256") for r in self.rows if r.get("model_sha256") not in (None, sha)}
            if other:
                r0 = next(r for r in self.rows if r.get("model_sha256") in other)
                raise PonderError(f"{self.dir} holds results of another model ({r0.get('model', '?')}, "
                                  f"fingerprint {r0.get('model_sha256')}, this one is {sha}); "
                                  "choose a new --out folder")
        self.done = {point_key(r) for r in self.rows}

    def has(self, key: tuple) -> bool:
        return key in self.done

    def find(self, key: tuple) -> dict[str, Any] | None:
        for r in reversed(self.rows):
            if point_key(r) == key:
                return r
        return None

    def append(self, row: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_clean(row), default=_json_default, allow_nan=False)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(fd).st_size > 0:  # a crash mid-write leaves no newline: start a fresh line, keep the bytes
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.append(json.loads(line))
        self.done.add(point_key(row))


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    if enabled:
        return tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True)

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def set_postfix_str(self, s: str) -> None: ...
        def write(self, s: str) -> None:
            print(s, file=sys.stderr)
        def close(self) -> None: ...

    return _Null()


def print_summary(summary: dict[str, Any], as_json: bool, what: str, unit: str,
                  headline: Callable[[str], str]) -> int:
    """The end of a bench run on the terminal (one JSON object with --json); exit status 1 if a point failed."""
    if as_json:
        print(json.dumps(summary))
    else:
        print(f"{what}: {summary['written']} {unit}, {summary['skipped']} already present, "
              f"{len(summary['failed'])} failed, {summary['seconds']:.0f} s; results in {summary['results']}")
        for f in summary["failed"]:
            print(f"  failed: {f}")
        if summary.get("report"):
            md = Path(summary["report"][-1])
            if md.suffix == ".md" and md.is_file():
                print(headline(md.read_text()))
            print("report: " + ", ".join(summary["report"]))
    return 1 if summary["failed"] else 0
