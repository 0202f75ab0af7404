"""Held-out evaluation data: ``code.txt``, ``prose.txt``, ``probes.jsonl`` and ``eval_manifest.json``.

Built from held-out items only, chosen by the same rule as the training corpus (:mod:`.sources`), so nothing
written here can be in ``corpus.txt``. The probes are short prefixes of held-out code with an exact short
continuation (see ``data/eval/README.md``).
"""

from __future__ import annotations

import hashlib
import io
import json
import keyword
import re
import sys
import tokenize
from pathlib import Path

from ..errors import PonderError
from .sources import (
    CODE_HELDOUT_FRACTION,
    CODE_HELDOUT_SALT,
    PROSE_HELDOUT_FRACTION,
    PROSE_HELDOUT_SALT,
    _code_document,
    _read_text,
    _unit_hash,
    default_stdlib_dir,
    fetch_wiki_dump,
    is_heldout_article,
    is_heldout_module,
    list_stdlib_files,
    read_wiki_dump,
    wiki_articles,
)

PROBE_MAX_PROMPT_CHARS = 1200
PROBE_MIN_PROMPT_CHARS = 300
_IDENT_END = frozenset(".()[],:=")


def _window_prompt(text: str, cut: int, max_chars: int = PROBE_MAX_PROMPT_CHARS) -> str | None:
    """The text before ``cut``, starting at a line boundary, at most ``max_chars`` long."""
    line_start = text.rfind("\n", 0, cut) + 1
    start = line_start
    while start > 0:
        prev = text.rfind("\n", 0, start - 1) + 1
        if cut - prev > max_chars:
            break
        start = prev
    prompt = text[start:cut]
    if len(prompt) < PROBE_MIN_PROMPT_CHARS or len(prompt) > max_chars:
        return None
    return prompt


def _probe_candidates(relpath: str, text: str, api_counts: dict[str, int]) -> list[dict]:
    """Every position in one held-out module where the continuation is short, exact and inferable.

    ``identifier``: a name right after ``.`` that already occurs in the prompt, or a well-known ``module.attr``
    that occurs often in the training code (factual recall). ``argument``: a name right after ``(`` that occurs
    in the prompt. ``line``: the rest of a line after ``(``, ``.`` or ``=`` when that exact text occurs earlier in
    the prompt, plus ``if __name__ == "__main__":``. Identifier answers carry the next punctuation character, so
    the prefix rule cannot accept ``_foo`` for ``_foobar``.
    """
    out: list[dict] = []
    line_offsets = [0]
    for line in text.splitlines(keepends=True):
        line_offsets.append(line_offsets[-1] + len(line))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return out
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME or keyword.iskeyword(tok.string) or i == 0:
            continue
        prev = tokens[i - 1]
        if prev.type != tokenize.OP or prev.string not in (".", "(") or prev.end != tok.start:
            continue
        start = line_offsets[tok.start[0] - 1] + tok.start[1]
        end = start + len(tok.string)
        nxt = text[end:end + 1]
        if nxt not in _IDENT_END or len(tok.string) < 3:
            continue
        prompt = _window_prompt(text, start)
        if prompt is None:
            continue
        in_prompt = re.search(rf"(?<![A-Za-z0-9_]){re.escape(tok.string)}(?![A-Za-z0-9_])", prompt) is not None
        owner = tokens[i - 2].string if i >= 2 and tokens[i - 2].type == tokenize.NAME else ""
        known = prev.string == "." and api_counts.get(f"{owner}.{tok.string}", 0) >= 20
        if not (in_prompt or known):
            continue
        kind = "identifier" if prev.string == "." else "argument"
        out.append({"file": relpath, "offset": start, "prompt": prompt, "answer": tok.string + nxt,
                    "identifier": tok.string, "kind": kind, "in_prompt": in_prompt})

    for ln, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or len(stripped) > 100:
            continue
        base = line_offsets[ln]
        m = re.fullmatch(r"\s*if __name__ == (['\"])__main__\1:\s*", line)
        cuts = [base + line.index("==") + 4] if m else []
        if not m:
            for j, ch in enumerate(line):
                if ch in "(.=" and j + 1 < len(line) and not line[j + 1].isspace():
                    cuts.append(base + j + 1)
        for cut in cuts:
            rest = text[cut:base + len(line.rstrip())]
            if not m and (len(rest) < 6 or len(rest) > 40 or not re.search(r"[(,. ]", rest)):
                continue
            if rest.count('"') % 2 or rest.count("'") % 2 or "#" in rest:
                continue
            prompt = _window_prompt(text, cut)
            if prompt is None:
                continue
            earlier = prompt[: prompt.rfind("\n") + 1]
            if not m and rest not in earlier:
                continue
            out.append({"file": relpath, "offset": cut, "prompt": prompt, "answer": rest, "identifier": None,
                        "kind": "line", "in_prompt": rest in earlier})
            break  # one cut per line: the earliest that qualifies
    return out


def _select_probes(cands: list[dict], n: int) -> list[dict]:
    """A deterministic, spread-out subset: hash order, at most 3 probes per answer per module, no two probes of a
    module within 120 characters of each other, and trivial answers (``self``) capped."""
    quota = {"identifier": 0.5, "argument": 0.2, "line": 0.3}
    cands = sorted(cands, key=lambda c: _unit_hash("ponder-probes-v1", f"{c['file']}:{c['offset']}:{c['kind']}"))
    chosen: list[dict] = []
    per_answer: dict[tuple[str, str], int] = {}
    taken: dict[str, list[int]] = {}
    per_kind = {k: 0 for k in quota}
    n_self = 0
    for c in cands:
        k = c["kind"]
        if per_kind[k] >= round(n * quota[k]):
            continue
        key = (c["file"], c["answer"])
        if per_answer.get(key, 0) >= 3:
            continue
        if any(abs(c["offset"] - o) < 120 for o in taken.get(c["file"], [])):
            continue
        is_self = c["identifier"] == "self" or c["answer"].startswith("self")
        if is_self and n_self >= n // 20:
            continue
        n_self += is_self
        chosen.append(c)
        per_answer[key] = per_answer.get(key, 0) + 1
        taken.setdefault(c["file"], []).append(c["offset"])
        per_kind[k] += 1
    chosen.sort(key=lambda c: (c["file"], c["offset"]))
    return chosen


def _api_counts(stdlib_dir: Path, files: list[str]) -> dict[str, int]:
    """How often each ``name.attr`` occurs in the *training* stdlib code: what a model could have learnt."""
    counts: dict[str, int] = {}
    pat = re.compile(r"(?<![A-Za-z0-9_.])([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
    for rel in files:
        if is_heldout_module(rel):
            continue
        for m in pat.finditer(_read_text(stdlib_dir / rel)):
            key = f"{m.group(1)}.{m.group(2)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def build_eval(
    out_dir: Path = Path("data/eval"),
    *,
    stdlib_dir: Path | None = None,
    wiki_dump: Path | None = None,
    cache_dir: Path | None = None,
    n_probes: int = 250,
) -> dict:
    """Write ``code.txt``, ``prose.txt``, ``probes.jsonl`` and ``eval_manifest.json`` from held-out items only.

    Uses the same selection functions as :func:`.corpus.build_corpus`, so nothing written here can be in the training
    corpus. Probes are short prefixes of held-out code with an exact short continuation; they are scored by exact
    match of the greedy continuation's first ``len(answer)`` characters (see ``data/eval/README.md``).
    """
    out_dir = Path(out_dir)
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    files = list_stdlib_files(root)
    held = [rel for rel in files if is_heldout_module(rel)]
    if not held:
        raise PonderError(f"no held-out stdlib modules under {root}")
    dump = read_wiki_dump(Path(wiki_dump)) if wiki_dump is not None else fetch_wiki_dump(cache_dir)
    articles = [(t, d) for t, d in wiki_articles(dump) if is_heldout_article(t)]
    if not articles:
        raise PonderError("no held-out Wikipedia articles in the dump")

    texts = {rel: _read_text(root / rel) for rel in held}
    code = "\n".join(_code_document(rel, texts[rel]).rstrip("\n") + "\n" for rel in held)
    prose = "\n\n".join(d.strip("\n") + "\n" for _, d in articles)
    api = _api_counts(root, files)
    cands = [c for rel in held for c in _probe_candidates(rel, texts[rel], api)]
    probes = _select_probes(cands, n_probes)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "code.txt").write_text(code, encoding="utf-8", newline="\n")
    (out_dir / "prose.txt").write_text(prose, encoding="utf-8", newline="\n")
    with open(out_dir / "probes.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for i, c in enumerate(probes):
            rec = {"id": f"p{i:04d}", "prompt": c["prompt"], "answer": c["answer"], "kind": c["kind"],
                   "identifier": c["identifier"], "in_prompt": c["in_prompt"], "source": c["file"]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for c in probes:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    manifest = {
        "format": "ponder-eval-v1",
        "python": sys.version.split()[0],
        "code": {"file": "code.txt", "modules": held, "bytes": len(code.encode("utf-8")),
                 "sha256": hashlib.sha256(code.encode("utf-8")).hexdigest()},
        "prose": {"file": "prose.txt", "articles": [t for t, _ in articles], "bytes": len(prose.encode("utf-8")),
                  "sha256": hashlib.sha256(prose.encode("utf-8")).hexdigest(),
                  "dump_sha256": hashlib.sha256(dump).hexdigest()},
        "probes": {"file": "probes.jsonl", "count": len(probes), "kinds": kinds, "candidates": len(cands),
                   "scoring": "greedy continuation of prompt; correct iff its first len(answer) characters == answer"},
        "heldout_rule": {"stdlib": f"sha1('{CODE_HELDOUT_SALT}:'+relpath) < {CODE_HELDOUT_FRACTION}, "
                                   "never encodings/*",
                         "wikipedia": f"sha1('{PROSE_HELDOUT_SALT}:'+title) < {PROSE_HELDOUT_FRACTION}"},
    }
    (out_dir / "eval_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest
