"""Corpus, tokenizer and held-out evaluation data, on tiny synthetic sources (no network, a few seconds)."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import numpy as np
import pytest

from ponder.errors import PonderError
from ponder.train.corpus import (
    build_all,
    build_corpus,
    iter_documents,
    load_tokenizer,
    tokenize_corpus,
    train_tokenizer,
)
from ponder.train.probes import PROBE_MAX_PROMPT_CHARS, build_eval
from ponder.train.sources import EOT, clean_wikitext, is_heldout_article, is_heldout_module

REPO = Path(__file__).resolve().parents[1]


def _module_text(i: int) -> str:
    return f'''"""Synthetic module number {i}: marker_{i}_unique."""

import os
import sys


class Widget{i}:
    """A small class so the probe builder finds attribute accesses."""

    def __init__(self, name, size=3):
        self.name = name
        self.size = size
        self._items = []

    def add(self, item):
        self._items.append(item)
        return len(self._items)

    def total(self):
        result = 0
        for item in self._items:
            result += item * self.size
        return result

    def describe(self):
        parts = [self.name, str(self.size), str(self.total())]
        return os.path.join(*parts)


def main(argv=None):
    widget = Widget{i}("w{i}", size={i % 5 + 1})
    widget.add({i})
    print(widget.describe(), file=sys.stderr)


if __name__ == "__main__":
    main()
'''


def _names_where(pred, prefix: str, n: int, want: bool, suffix: str = "") -> list[str]:
    """The first n names prefix<i>suffix that the held-out predicate puts (or does not put) in the eval set."""
    out, i = [], 0
    while len(out) < n:
        name = f"{prefix}{i}{suffix}"
        if pred(name) is want:
            out.append(name)
        i += 1
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("src")
    stdlib = root / "stdlib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    (stdlib / "test" / "test_x.py").write_text("TEST_FOLDER_MARKER = 1\n")
    held = _names_where(is_heldout_module, "pkg/m", 2, True, ".py")
    kept = _names_where(is_heldout_module, "pkg/m", 8, False, ".py")
    for k, rel in enumerate(sorted(held + kept)):
        (stdlib / rel).write_text(_module_text(k), encoding="utf-8")
    (stdlib / "latin.py").write_bytes(b"# caf\xe9 is not utf-8\nX = 1\n")  # invalid UTF-8 must not abort
    docs = root / "docs"
    (docs / "library").mkdir(parents=True)
    (docs / "intro.rst.txt").write_text("Introduction\n============\n\nSome *docs* text.\n")
    held_mod = held[0][: -len(".py")].replace("/", ".")
    (docs / "library" / f"{held_mod}.rst.txt").write_text("HELDOUT_DOC_PAGE_MARKER\n")
    titles_held = _names_where(is_heldout_article, "Held title ", 2, True)
    titles_kept = _names_where(is_heldout_article, "Kept title ", 4, False)
    pages = []
    for k, title in enumerate(titles_held + titles_kept):
        body = (f"'''{title}''' is a [[topic|subject]] about item {k}.<ref>cite {k}</ref> {{{{Infobox|x=1}}}}\n\n"
                + " ".join(f"Sentence {j} of article {k} mentions [[Thing {j}]] and token_{k}_{j}." for j in range(30))
                + "\n\n== References ==\n* a reference line REFERENCE_MARKER\n")
        pages.append(f"<page><title>{title}</title><ns>0</ns><id>{k}</id><revision><text>"
                     f"{body.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</text></revision></page>")
    pages.append("<page><title>Redirected</title><ns>0</ns><id>99</id><revision><text>#REDIRECT [[X]]"
                 "</text></revision></page>")
    xml = f"<mediawiki>{''.join(pages)}</mediawiki>"
    dump = root / "wiki.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode("utf-8")))
    return {"stdlib_dir": stdlib, "docs_dir": docs, "wiki_dump": dump, "held": held, "kept": kept,
            "titles_held": titles_held, "titles_kept": titles_kept}


def _dirs(s: dict) -> dict:
    return {"stdlib_dir": s["stdlib_dir"], "docs_dir": s["docs_dir"], "wiki_dump": s["wiki_dump"]}


def _eval_dirs(s: dict) -> dict:
    return {"stdlib_dir": s["stdlib_dir"], "wiki_dump": s["wiki_dump"]}


def test_corpus_is_deterministic(sources, tmp_path):
    a = build_corpus(tmp_path / "a", **_dirs(sources))
    b = build_corpus(tmp_path / "b", **_dirs(sources))
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "corpus.txt").read_bytes() == (tmp_path / "b" / "corpus.txt").read_bytes()
    assert a["sources_used"] == ["stdlib", "pydocs", "wikipedia"]
    files = a["sources"]["stdlib"]["files"]
    assert files == sorted(files) and "latin.py" in files
    assert not any(f.startswith("test/") for f in files)
    text = (tmp_path / "a" / "corpus.txt").read_text(encoding="utf-8")
    assert "caf\ufffd" in text and "TEST_FOLDER_MARKER" not in text
    assert text.count(EOT) == a["documents"] - 1
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["sha256"] == a["sha256"]


def test_heldout_never_in_training_corpus(sources, tmp_path):
    m = build_corpus(tmp_path / "c", **_dirs(sources))
    text = (tmp_path / "c" / "corpus.txt").read_text(encoding="utf-8")
    assert sorted(m["heldout"]["stdlib"]) == sorted(sources["held"])
    assert sorted(m["heldout"]["wikipedia"]) == sorted(sources["titles_held"])
    for k, rel in enumerate(sorted(sources["held"] + sources["kept"])):
        marker = f"marker_{k}_unique"
        assert (marker in text) is (rel in sources["kept"]), rel
    for k, title in enumerate(sources["titles_held"] + sources["titles_kept"]):
        assert (f"token_{k}_0." in text) is (title in sources["titles_kept"]), title
        assert (title in text) is (title in sources["titles_kept"])
    assert "HELDOUT_DOC_PAGE_MARKER" not in text  # a held-out module's doc page goes with it
    assert "REFERENCE_MARKER" not in text and "<ref>" not in text and "{{" not in text and "[[" not in text
    assert "Redirected" not in text

    ev = build_eval(tmp_path / "eval", n_probes=20, **_eval_dirs(sources))
    code = (tmp_path / "eval" / "code.txt").read_text(encoding="utf-8")
    prose = (tmp_path / "eval" / "prose.txt").read_text(encoding="utf-8")
    assert ev["code"]["modules"] == sorted(sources["held"])
    for line in code.splitlines():
        if "unique" in line or line.startswith("# file:"):
            assert line not in text
    for para in prose.split("\n\n"):
        if len(para) > 40:
            assert para not in text


def test_eval_probes_are_well_formed(sources, tmp_path):
    build_eval(tmp_path / "eval", n_probes=20, **_eval_dirs(sources))
    code = (tmp_path / "eval" / "code.txt").read_text(encoding="utf-8")
    probes = [json.loads(line) for line in (tmp_path / "eval" / "probes.jsonl").read_text().splitlines()]
    assert probes, "synthetic modules should yield probes"
    for p in probes:
        assert set(p) >= {"id", "prompt", "answer", "kind"}
        assert p["kind"] in {"identifier", "argument", "line"}
        assert 0 < len(p["prompt"]) <= PROBE_MAX_PROMPT_CHARS
        assert p["answer"] and not p["answer"][0].isspace()
        assert p["prompt"] + p["answer"] in code
    again = (tmp_path / "eval2")
    build_eval(again, n_probes=20, **_eval_dirs(sources))
    assert (again / "probes.jsonl").read_bytes() == (tmp_path / "eval" / "probes.jsonl").read_bytes()


ROUND_TRIP = [
    "def f(x):\n\tif x:\n        return  x  \n\n\n",
    "    \t  \n\t\t\tdeep = {'a': [1, 2]}\r\n",
    "naïve café — 日本語テキスト 🙂 Ωmega\u00a0nbsp\u200bzero-width",
    "  leading spaces and trailing   ",
    "a<|endoftext|>b",
    "",
]


def test_tokenizer_round_trip(sources, tmp_path):
    build_corpus(tmp_path, **_dirs(sources))
    train_tokenizer(tmp_path / "corpus.txt", tmp_path / "tokenizer.json", vocab_size=400)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.token_to_id(EOT) == 0
    assert tok.encode("x<|endoftext|>y").ids.count(0) == 1
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for s in ROUND_TRIP:
        ids = hf.encode(s, add_special_tokens=False)
        assert ids == tok.encode(s).ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == s


def test_tokenize_corpus_bins(sources, tmp_path):
    m = build_all(tmp_path, vocab_size=400, **_dirs(sources))
    t = m["tokens"]
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert train.size == t["train_tokens"] and val.size == t["val_tokens"] and val.size > 0
    assert int((train == 0).sum()) == t["train_documents"] and int((val == 0).sum()) == t["val_documents"]
    assert t["train_documents"] + t["val_documents"] == m["documents"]
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    docs = set(iter_documents(tmp_path / "corpus.txt"))
    decoded = tok.decode(np.concatenate([train, val]).tolist(), skip_special_tokens=False).split(EOT)
    assert decoded[-1] == "" and set(decoded[:-1]) == docs
    assert "tokenizer_sha256" in m


def test_missing_and_empty_sources(sources, tmp_path):
    d = _dirs(sources)
    with pytest.raises(PonderError, match="stdlib source not found"):
        build_corpus(tmp_path / "o", **{**d, "stdlib_dir": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(PonderError, match="stdlib source is empty"):
        build_corpus(tmp_path / "o", **{**d, "stdlib_dir": tmp_path / "empty"})
    with pytest.raises(PonderError, match="wikipedia source not found"):
        build_corpus(tmp_path / "o", **{**d, "wiki_dump": tmp_path / "nope.bz2"})
    (tmp_path / "bad.bz2").write_bytes(b"not bz2")
    with pytest.raises(PonderError, match="not a valid bz2"):
        build_corpus(tmp_path / "o", **{**d, "wiki_dump": tmp_path / "bad.bz2"})
    with pytest.raises(PonderError, match="pydocs source not found"):
        build_corpus(tmp_path / "o", ["pydocs"], docs_dir=tmp_path / "nope")
    with pytest.raises(PonderError, match="pydocs source is empty"):
        build_corpus(tmp_path / "o", ["pydocs"], docs_dir=tmp_path / "empty")
    with pytest.raises(PonderError, match="unknown corpus source"):
        build_corpus(tmp_path / "o", ["nope"])
    with pytest.raises(PonderError, match="corpus not found"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "t.json")
    with pytest.raises(PonderError, match="tokenizer not found"):
        tokenize_corpus(tmp_path / "missing.txt", tmp_path / "t.json", tmp_path)
    for exc in (PonderError,):
        try:
            build_corpus(tmp_path / "o", **{**d, "stdlib_dir": tmp_path / "nope"})
        except exc as e:
            assert "\n" not in str(e)
    # The default source set treats pydocs as optional: skipped with a recorded note, not an error.
    m = build_corpus(tmp_path / "o", stdlib_dir=d["stdlib_dir"], docs_dir=tmp_path / "nope",
                       wiki_dump=d["wiki_dump"])
    assert m["sources_used"] == ["stdlib", "wikipedia"] and "pydocs" in m["sources_skipped"]


def test_clean_wikitext():
    raw = ("'''Bold''' [[Link target|label]] and [[Plain]] [[File:x.png|thumb|a [[nested]] caption]] "
           "{{cite|a={{inner}}}} [http://example.com Example] &nbsp;x<ref name=a>gone</ref>\n"
           "{| class=wikitable\n|-\n| cell\n|}\n== History ==\ntext\n== See also ==\n* other\n")
    out = clean_wikitext(raw)
    assert out.startswith("Bold label and Plain Example x")
    assert "History" in out and "text" in out
    assert not any(s in out for s in ("[[", "{{", "cell", "gone", "other", "caption", "'''"))


def test_committed_eval_files_match_selection():
    """The committed evaluation set is exactly what the selection functions hold out, and small."""
    ev = REPO / "data" / "eval"
    if not (ev / "eval_manifest.json").is_file():
        pytest.skip("data/eval not built")
    m = json.loads((ev / "eval_manifest.json").read_text())
    assert all(is_heldout_module(rel) for rel in m["code"]["modules"])
    assert all(is_heldout_article(t) for t in m["prose"]["articles"])
    total = sum(p.stat().st_size for p in ev.iterdir() if p.is_file())
    assert total <= 2_000_000
    code = (ev / "code.txt").read_text(encoding="utf-8")
    assert all(f"# file: {rel}\n" in code for rel in m["code"]["modules"])
    probes = [json.loads(line) for line in (ev / "probes.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 200 <= len(probes) <= 300 and len({p["id"] for p in probes}) == len(probes)
    for p in probes:
        assert len(p["prompt"]) <= PROBE_MAX_PROMPT_CHARS and not p["answer"][0].isspace()
        assert p["prompt"] + p["answer"] in code
