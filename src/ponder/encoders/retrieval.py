"""The shipped retrieval set (``data/retrieval/``): passages, queries with one gold passage each, and a calibration
split; its builder; and the metrics the embed bench reports.

Construction (an inverse cloze task, as in Lee et al. 2019, "Latent Retrieval for Weakly Supervised Open Domain
QA"): passages are prose paragraphs of the Python documentation (reStructuredText sources, markup stripped) and of
the held-out Wikipedia articles in ``data/eval/prose.txt``. For a query, one sentence is cut out of a passage; the
passage without that sentence is its gold passage. Everything is chosen by salted hashes of names and texts, so
the build is deterministic. Documentation files and Wikipedia paragraphs are split between the bench and a
calibration split by hash; policies fit their knobs on the calibration split only.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import PonderError

DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
DOC_DIRS = ("tutorial", "library", "reference", "howto", "faq", "using", "extending", "c-api", "installing",
            "distributing", "glossary.rst.txt")
MIN_WORDS, MAX_WORDS = 30, 200
N_PASSAGES, N_QUERIES, N_WIKI_QUERIES, N_CALIB = 3000, 500, 150, 256
SALT = "ponder-retrieval-v1"


def data_dir() -> Path:
    here = Path(__file__).resolve()
    for p in (here.parents[3] / "data" / "retrieval", here.parents[1] / "_data" / "retrieval"):
        if p.is_dir():
            return p
    return here.parents[3] / "data" / "retrieval"


def _h(*parts: str) -> float:
    return int(hashlib.sha1(":".join((SALT,) + parts).encode()).hexdigest()[:12], 16) / 2 ** 48


# ---- reStructuredText -> prose paragraphs ---------------------------------------------------------------------------
_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`__?")
_LIT = re.compile(r"``([^`]*)``")
_REF = re.compile(r"`([^`]*)`_{1,2}")
_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_SKIP_START = ("..", ">>>", "+-", "+=", "|", "==", "--", "~~", "**", "::", "#", "$", "%", "$ ")


def _role_text(m: re.Match) -> str:
    t = m.group(1)
    if "<" in t and t.endswith(">"):
        return t[:t.index("<")].strip()
    t = t.lstrip("!")
    if t.startswith("~"):
        t = t[1:].rsplit(".", 1)[-1]
    return t


def clean_rst(text: str) -> str:
    t = _ROLE.sub(_role_text, text)
    t = _LINK.sub(r"\1", t)
    t = _LIT.sub(r"\1", t)
    t = _REF.sub(r"\1", t)
    t = _EMPH.sub(r"\1", t)
    t = t.replace("\\ ", "").replace("\\", "")
    t = re.sub(r"::$", ":", t.strip())
    return re.sub(r"\s+", " ", t).strip()


def rst_paragraphs(src: str) -> list[str]:
    """Prose paragraphs of one reST file: literal blocks (after ``::``), directives, tables, headings and doctest
    sessions are left out."""
    lines = src.splitlines()
    out: list[str] = []
    i, code_indent = 0, -1
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        block, ind = [], len(lines[i]) - len(lines[i].lstrip())
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if code_indent >= 0:
            if ind > code_indent:
                continue  # inside a literal block
            code_indent = -1
        first = block[0].strip()
        if block[-1].rstrip().endswith("::"):
            code_indent = ind
        if first.startswith(_SKIP_START) or (len(block) >= 2 and set(block[1].strip()) <= set("=-~*^#\"'`+:.")):
            continue  # directive, table, heading, doctest
        if any(len(ln) - len(ln.lstrip()) != ind for ln in block[1:]) or first[:2] in ("* ", "- ", "#."):
            continue  # definition lists, bullet lists, field lists: not running prose
        if re.match(r"^\d+\.\s", first):
            continue
        text = clean_rst(" ".join(ln.strip() for ln in block))
        if text:
            out.append(text)
    return out


def _prose_ok(t: str) -> bool:
    w = t.split()
    if not MIN_WORDS <= len(w) <= MAX_WORDS:
        return False
    letters = sum(c.isalpha() for c in t)
    return letters > 0.7 * len(t.replace(" ", "")) and t[-1] in ".:)\"'"


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ABBR = ("e.g.", "i.e.", "etc.", "vs.", "Mr.", "Dr.", "St.", "No.", "approx.", "Jr.", "cf.", "U.S.")


def sentences(t: str) -> list[str]:
    parts = _SENT.split(t)
    out: list[str] = []
    for p in parts:
        if out and out[-1].endswith(_ABBR):
            out[-1] += " " + p
        else:
            out.append(p)
    return out


# ---- the builder ----------------------------------------------------------------------------------------------------
def _doc_files(root: Path) -> Iterable[Path]:
    for d in DOC_DIRS:
        p = root / d
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from sorted(p.rglob("*.rst.txt"))


def collect(docs_root: Path, prose: Path) -> list[dict[str, Any]]:
    """Every eligible paragraph, with its source and split."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in _doc_files(docs_root):
        rel = f.relative_to(docs_root).as_posix()
        split = "calib" if _h("doc-split", rel) < 0.1 else "bench"
        for k, t in enumerate(rst_paragraphs(f.read_text(encoding="utf-8", errors="replace"))):
            if _prose_ok(t) and t not in seen:
                seen.add(t)
                items.append({"text": t, "source": f"pydocs:{rel}#{k}", "split": split})
    for art in prose.read_text(encoding="utf-8").split("\n\n\n"):
        paras = [p.strip() for p in art.strip().split("\n\n")]
        title = paras[0]
        for k, t in enumerate(paras[1:], 1):
            t = re.sub(r"\s+", " ", t)
            if _prose_ok(t) and t not in seen:
                seen.add(t)
                split = "calib" if _h("wiki-split", title, str(k)) < 0.1 else "bench"
                items.append({"text": t, "source": f"wikipedia:{title}#{k}", "split": split})
    return items


def _cut_query(text: str, key: str) -> tuple[str, str] | None:
    """(query sentence, passage without it), or None when the paragraph has no suitable sentence."""
    sents = sentences(text)
    if len(sents) < 3:
        return None
    cands = [j for j, s in enumerate(sents) if 8 <= len(s.split()) <= 40 and s[-1] in ".!?"]
    if not cands:
        return None
    j = min(cands, key=lambda j: _h("sent", key, str(j)))
    rest = " ".join(s for k, s in enumerate(sents) if k != j)
    if len(rest.split()) < 20:
        return None
    return sents[j], rest


def _docs_version(root: Path) -> str:
    """The documentation package the passages were cut from (Debian python3.11-doc), for the manifest."""
    try:
        v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3.11-doc"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v = ""
    return f"python3.11-doc {v}" if v else str(root)


def build_retrieval(out: Path | None = None, docs_root: Path = DOCS_ROOT, prose: Path | None = None
                    ) -> dict[str, Any]:
    """Write passages.jsonl, queries.jsonl, calib.jsonl and manifest.json into ``out``; returns the manifest."""
    out = Path(out) if out is not None else data_dir()
    prose = prose or Path(__file__).resolve().parents[3] / "data" / "eval" / "prose.txt"
    if not docs_root.is_dir():
        raise PonderError(f"{docs_root} is missing; install the Python documentation sources "
                          "(apt-get install python3.11-doc) to rebuild the retrieval set")
    items = collect(docs_root, prose)
    bench = [it for it in items if it["split"] == "bench"]
    calib = sorted((it for it in items if it["split"] == "calib"), key=lambda it: _h("calib", it["source"]))
    bench.sort(key=lambda it: _h("order", it["source"]))
    queries, gold_src = [], set()
    want = {"wikipedia": N_WIKI_QUERIES, "pydocs": N_QUERIES - N_WIKI_QUERIES}
    for it in bench:
        kind = it["source"].split(":", 1)[0]
        if want[kind] <= 0:
            continue
        cut = _cut_query(it["text"], it["source"])
        if cut is None:
            continue
        it["text"] = cut[1]
        queries.append({"text": cut[0], "source": it["source"]})
        gold_src.add(it["source"])
        want[kind] -= 1
    # every remaining Wikipedia paragraph (there are few), then documentation paragraphs up to N_PASSAGES
    rest = sorted((it for it in bench if it["source"] not in gold_src), key=lambda it: not it["source"].startswith("w"))
    chosen = [it for it in bench if it["source"] in gold_src] + rest[:max(0, N_PASSAGES - len(gold_src))]
    chosen.sort(key=lambda it: it["source"])
    pid = {it["source"]: f"p{k:05d}" for k, it in enumerate(chosen)}
    queries.sort(key=lambda q: pid[q["source"]])
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> str:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (out / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    sums = {
        "passages.jsonl": dump("passages.jsonl", [{"id": pid[it["source"]], "text": it["text"],
                                                   "source": it["source"]} for it in chosen]),
        "queries.jsonl": dump("queries.jsonl", [{"id": f"q{k:04d}", "text": q["text"], "gold": pid[q["source"]]}
                                                for k, q in enumerate(queries)]),
        "calib.jsonl": dump("calib.jsonl", [{"text": it["text"], "source": it["source"]}
                                            for it in calib[:N_CALIB]]),
    }
    man = {"builder": "ponder.encoders.retrieval.build_retrieval", "salt": SALT, "docs": _docs_version(docs_root),
           "prose": f"{prose.name}:{hashlib.sha256(prose.read_bytes()).hexdigest()[:16]}",
           "passages": len(chosen), "queries": len(queries), "calib": min(N_CALIB, len(calib)),
           "passages_by_source": {k: sum(it["source"].startswith(k) for it in chosen)
                                  for k in ("pydocs", "wikipedia")},
           "queries_by_source": {k: sum(q["source"].startswith(k) for q in queries) for k in ("pydocs", "wikipedia")},
           "eligible_paragraphs": len(items), "min_words": MIN_WORDS, "max_words": MAX_WORDS,
           "sha256": sums}
    (out / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    return man


# ---- reading -----------------------------------------------------------------------------------------------------
def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    if not p.is_file():
        raise PonderError(f"{p} is missing; rebuild it with python -m ponder.encoders.retrieval")
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


@lru_cache(maxsize=2)
def load_retrieval(folder: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    d = Path(folder) if folder else data_dir()
    return _read_jsonl(d / "passages.jsonl"), _read_jsonl(d / "queries.jsonl")


@lru_cache(maxsize=1)
def calib_texts() -> list[str]:
    p = data_dir() / "calib.jsonl"
    return [r["text"] for r in _read_jsonl(p)] if p.is_file() else []


# ---- metrics --------------------------------------------------------------------------------------------------------
def rank_topk(q, p, k: int = 10):
    """Indices (Q, k) of the k passages with the highest dot product (embeddings are normalised: cosine)."""
    return torch.topk(q @ p.T, k, dim=1).indices


def recall_at_k(top, gold) -> float:
    """Share of queries whose gold passage is in their top k."""
    return float((top == gold[:, None]).any(1).float().mean())


def overlap_at_k(top, ref_top) -> float:
    """Mean |top_k ∩ dense top_k| / k: how much of the dense ranking a policy keeps."""
    k = top.shape[1]
    return float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, ref_top)) / (k * len(top)))


if __name__ == "__main__":  # python -m ponder.encoders.retrieval [OUT]
    print(json.dumps(build_retrieval(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=1))
