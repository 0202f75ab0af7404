"""Instruction prompts built from the held-out files: questions whose answers are in the prose, and editing,
renaming and explaining requests over the held-out code.

Why: a chat model is used on requests like these, and most of them are *input-grounded*: the answer copies spans of
the prompt (a renamed function, a passage quoted back). That is where prompt-lookup drafting is meant to pay, so the
bench times it on these prompts apart from open continuation. Built deterministically from ``data/eval/code.txt``
and ``prose.txt`` (``ponder data instruct``), so nobody tuned them to a method; the set ships as
``data/eval/instruct.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import PonderError

# kind -> (grounded: the answer is expected to reuse the prompt's text, template)
KINDS: dict[str, tuple[bool, str]] = {
    "qa": (True, "Read the passage and answer the question.\n\n{passage}\n\nQuestion: according to the passage, "
                 "what is {title}? Answer by quoting the passage."),
    "rename": (True, "Rename the function `{name}` to `{new}` in this code and return the whole code, unchanged "
                     "otherwise.\n\n```python\n{code}\n```"),
    "docstring": (True, "Add a one-line docstring to this Python function and return the complete function.\n\n"
                        "```python\n{code}\n```"),
    "summary": (False, "Summarize the following text in two sentences.\n\n{passage}"),
    "explain": (False, "Explain in two sentences what this Python function does.\n\n```python\n{code}\n```"),
}
PASSAGE_KINDS = ("qa", "summary")  # the kinds built on a prose passage; the others on a function
PLAN = (("qa", 5), ("rename", 4), ("docstring", 3), ("summary", 2), ("explain", 2))


def _passages(prose: str) -> list[tuple[str, str]]:
    """(title, passage) per article: its first paragraphs, 300-1200 characters."""
    out = []
    for art in re.split(r"\n\s*\n\s*\n", prose):
        parts = [p.strip() for p in art.strip().split("\n\n") if p.strip()]
        if len(parts) < 2 or len(parts[0]) > 80:
            continue
        body = ""
        for para in parts[1:]:
            if len(para) < 120:  # a heading
                continue
            if len(body) + len(para) > 1200:
                break
            body = (body + "\n\n" + para).strip()
        if len(body) >= 300:
            out.append((parts[0], body))
    return out


def _functions(code: str) -> list[tuple[str, str]]:
    """(name, source) of top-level or method ``def`` blocks of 6-24 lines."""
    lines = code.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)def (\w+)\(", lines[i])
        if not m:
            i += 1
            continue
        ind = len(m.group(1))
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > ind):
            j += 1
        block = [ln[ind:] for ln in lines[i:j]]
        while block and not block[-1].strip():
            block.pop()
        head = "\n".join(block[:2])
        if 6 <= len(block) <= 24 and '"""' not in head and "'''" not in head and not m.group(2).startswith("__"):
            out.append((m.group(2), "\n".join(block)))
        i = j
    return out


def _spread(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(k * step)] for k in range(n)]


def _request(kind: str, item: tuple[str, str], rid: str) -> dict[str, Any]:
    """One request of ``kind`` on a (title, passage) or (name, source) item."""
    grounded, tpl = KINDS[kind]
    if kind in PASSAGE_KINDS:
        title, passage = item
        text = tpl.format(title=title, passage=passage)
    else:
        name, src = item
        text = tpl.format(name=name, new=f"{name}_v2", code=src)
    return {"id": rid, "kind": kind, "grounded": grounded, "messages": [{"role": "user", "content": text}]}


def chat_requests(code: str, prose: str, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` requests of every kind in turn, spread over the functions and passages of any text (the draft
    head's training prompts come from training text this way, never from the evaluation files)."""
    funcs, passages = _functions(code), _passages(prose)
    kinds = [k for k in KINDS if (passages if k in PASSAGE_KINDS else funcs)]
    if not kinds:
        return []
    out: list[dict[str, Any]] = []
    fi = pi = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind in PASSAGE_KINDS:
            item = passages[(pi * 7919) % len(passages)]
            pi += 1
        else:
            item = funcs[(fi * 7919) % len(funcs)]
            fi += 1
        out.append(_request(kind, item, f"{kind}-{i:04d}"))
    return out


def build_instruct(code: str, prose: str) -> list[dict[str, Any]]:
    """The prompt set: ``{"id", "kind", "grounded", "messages"}`` per prompt, spread evenly over both files."""
    passages, funcs = _passages(prose), _functions(code)
    if len(passages) < 7 or len(funcs) < 9:
        raise PonderError("the evaluation files are too short to build the instruction prompts")
    psel, fsel = _spread(passages, 7), _spread(funcs, 9)
    out = []
    pi = fi = 0
    for kind, n in PLAN:
        for _ in range(n):
            if kind in PASSAGE_KINDS:
                item = psel[pi]
                pi += 1
            else:
                item = fsel[fi]
                fi += 1
            out.append(_request(kind, item, f"{kind}-{len(out):02d}"))
    return out


def write_instruct(code_path: str | Path, prose_path: str | Path, out: str | Path) -> Path:
    items = build_instruct(Path(code_path).read_text(), Path(prose_path).read_text())
    p = Path(out)
    p.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    return p


def load_instruct(path: str | Path, grounded: bool | None = None) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise PonderError(f"{p} not found; rebuild it with `ponder data instruct --out {p}`")
    items = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return [it for it in items if grounded is None or it["grounded"] == grounded]
