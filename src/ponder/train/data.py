"""Training corpus, tokenizer and held-out evaluation data, all rebuilt from sources a fresh machine can get.

Why this module exists: a benchmark of token-adaptive inference is only honest if the reference model was trained
on data we can name and rebuild byte for byte, and if the evaluation text was never seen in training. Everything
here is therefore deterministic (sorted file lists, fixed hash-based selections, pinned downloads) and records what
it used in ``manifest.json``. The held-out selection is a pure function of an item's *name* (a stdlib path or a
Wikipedia title), so the training builder and the evaluation builder cannot disagree about it, whichever Python
interpreter or machine runs them.

Sources (see ``data/eval/README.md`` and ``data/LICENSES.md`` for licences):

* ``stdlib``: the running interpreter's standard library ``.py`` files, without site-packages and test folders
  (PSF licence).
* ``pydocs``: Python's documentation sources (reStructuredText ``_sources``) from Debian's ``python3.11-doc``;
  optional by default, since it needs ``apt-get install python3.11-doc`` (PSF licence).
* ``wikipedia``: the shortened English Wikipedia dump in the gensim wheel's test data, fetched with
  ``pip download`` at build time (never at model run time) and read out of the wheel without installing it
  (CC BY-SA, Wikipedia contributors).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import json
import keyword
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import tokenize
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ponder.errors import PonderError

EOT = "<|endoftext|>"
"""The one special token: separates documents in ``corpus.txt`` and is token id 0."""

DEFAULT_SOURCES = ("stdlib", "pydocs", "wikipedia")
OPTIONAL_BY_DEFAULT = frozenset({"pydocs"})
KNOWN_SOURCES = frozenset({"stdlib", "pydocs", "wikipedia"})

# Pinned so the Wikipedia sample (and therefore the corpus hash) does not drift with new gensim releases.
GENSIM_REQUIREMENT = "gensim==4.4.0"
GENSIM_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_DOCS_DIRS = (
    Path("/usr/share/doc/python3.11/html/_sources"),
    Path("/usr/share/doc/python3.11-doc/html/_sources"),
)

# Folders that hold tests, not library code: they are 60 % of the stdlib's bytes and very repetitive.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"})

# Held-out selection. Salts are part of the definition: changing one changes the evaluation set.
CODE_HELDOUT_SALT = "ponder-heldout-code-v1"
CODE_HELDOUT_FRACTION = 0.02
PROSE_HELDOUT_SALT = "ponder-heldout-prose-v1"
PROSE_HELDOUT_FRACTION = 0.05
VAL_SALT = "ponder-val-v1"

CORPUS_FILE = "corpus.txt"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Held-out selection (shared by the training builder and the evaluation builder)


def _unit_hash(salt: str, name: str) -> float:
    """Map a name to [0, 1) stably across machines and Python versions (unlike ``hash``)."""
    digest = hashlib.sha1(f"{salt}:{name}".encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def is_heldout_module(relpath: str) -> bool:
    """Whether a stdlib file (POSIX path relative to the stdlib root) is evaluation-only.

    A function of the path alone, so a different interpreter build holds out the same modules by name. The
    ``encodings`` package is never held out: its codec tables are generated and near-identical to each other, so
    holding one out would measure copying of a sibling table, not modelling of code.
    """
    if relpath.startswith("encodings/"):
        return False
    return _unit_hash(CODE_HELDOUT_SALT, relpath) < CODE_HELDOUT_FRACTION


def is_heldout_article(title: str) -> bool:
    """Whether a Wikipedia article (by title) is evaluation-only."""
    return _unit_hash(PROSE_HELDOUT_SALT, title) < PROSE_HELDOUT_FRACTION


def _doc_page_module(relpath: str) -> str | None:
    """The module a ``library/<name>.rst.txt`` documentation page describes, if any."""
    m = re.fullmatch(r"library/([A-Za-z0-9_.]+)\.rst\.txt", relpath)
    return m.group(1) if m else None


def _module_names(relpath: str) -> set[str]:
    """Dotted names a stdlib file is documented under (``json/decoder.py`` -> ``json.decoder``)."""
    parts = relpath[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return {".".join(parts)} if parts else set()


# ----------------------------------------------------------------------------------------------------------------
# Reading sources


def _read_text(path: Path) -> str:
    """Decode as UTF-8 with replacement: a few stdlib files hold Latin-1 test bytes, and one bad byte must not
    change the rest of the file or abort the build."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace(EOT, "<|endoftext |>")


def default_stdlib_dir() -> Path:
    """The running interpreter's library: always present, so the corpus never needs a download for code."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(stdlib_dir: Path) -> list[str]:
    """Sorted POSIX relative paths of the library's ``.py`` files, test folders and site-packages excluded."""
    if not stdlib_dir.is_dir():
        raise PonderError(f"stdlib source not found: {stdlib_dir} is not a directory")
    out: list[str] = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        rel_root = Path(root).relative_to(stdlib_dir)
        for name in files:
            if name.endswith(".py"):
                out.append((rel_root / name).as_posix())
    out.sort()
    return out


def list_doc_files(docs_dir: Path) -> list[str]:
    """Sorted relative paths of the documentation's reStructuredText sources."""
    if not docs_dir.is_dir():
        raise PonderError(f"pydocs source not found: {docs_dir} is not a directory (apt-get install python3.11-doc)")
    return sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.rglob("*.txt") if p.is_file())


def find_docs_dir() -> Path | None:
    """Where Debian's python3.11-doc put the doc sources, or None: the docs are an optional extra."""
    for d in DEFAULT_DOCS_DIRS:
        if d.is_dir() and any(d.rglob("*.rst.txt")):
            return d
    return None


def fetch_wiki_dump(cache_dir: Path | None = None) -> bytes:
    """Download the pinned gensim wheel with pip (no install) and return the compressed Wikipedia sample.

    Only called at corpus build time. The wheel itself (28 MB) is not kept; pass ``cache_dir`` to keep the
    1.7 MB ``.bz2`` so a rebuild needs no network.
    """
    if cache_dir is not None:
        cached = cache_dir / Path(GENSIM_WIKI_MEMBER).name
        if cached.is_file():
            return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="ponder-gensim-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", GENSIM_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PonderError(f"wikipedia source unavailable: `pip download {GENSIM_REQUIREMENT}` failed ({last})")
        data = read_wiki_dump(wheels[0])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / Path(GENSIM_WIKI_MEMBER).name).write_bytes(data)
    return data


def read_wiki_dump(path: Path) -> bytes:
    """Compressed dump bytes from a gensim wheel, a ``.bz2`` dump, or an uncompressed ``.xml`` (tests)."""
    if not path.is_file():
        raise PonderError(f"wikipedia source not found: {path}")
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            try:
                return zf.read(GENSIM_WIKI_MEMBER)
            except KeyError:
                raise PonderError(f"wikipedia source: {path.name} has no {GENSIM_WIKI_MEMBER}") from None
    data = path.read_bytes()
    return data if path.suffix == ".bz2" else bz2.compress(data)


def iter_wiki_pages(dump_bz2: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) for every main-namespace, non-redirect page, in dump order."""
    try:
        raw = bz2.decompress(dump_bz2)
    except (OSError, ValueError) as exc:
        raise PonderError(f"wikipedia source is not a valid bz2 dump ({exc})") from None
    title, ns, text = None, None, None
    try:
        for _event, elem in ET.iterparse(io.BytesIO(raw), events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = (elem.text or "").strip()
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if title and ns == "0" and text and not re.match(r"\s*#redirect", text, re.I):
                    yield title, text
                title, ns, text = None, None, None
                elem.clear()
    except ET.ParseError as exc:
        raise PonderError(f"wikipedia source is not valid MediaWiki XML ({exc})") from None


# ----------------------------------------------------------------------------------------------------------------
# Wiki markup -> plain paragraphs


_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "citations", "footnotes", "notes and references", "works cited", "gallery"}
_DROP_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap", "chem",
              "hiero", "graph", "templatedata", "mapframe", "references", "code", "pre", "nowiki")
_LINK_DROP_PREFIX = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|wikt|wiktionary|commons|s|q|"
                               r"special|help|portal|template|user|talk|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def clean_wikitext(text: str) -> str:
    """Plain paragraphs from MediaWiki markup.

    A small regex cleaner rather than a wiki parser: it only has to turn one fixed dump into readable English, and
    it must not pull in a dependency. Templates, tables, references, files and citation sections are dropped;
    links keep their visible label.
    """
    t = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for tag in _DROP_TAGS:
        t = re.sub(rf"<{tag}\b[^>]*/>", "", t, flags=re.I)
        t = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", t, flags=re.I | re.S)
    t = re.sub(r"<br\s*/?>", " ", t, flags=re.I)
    for _ in range(20):  # innermost first, until nothing nested is left
        t2 = _INNER_TEMPLATE.sub("", t)
        t2 = _INNER_TABLE.sub("", t2)
        if t2 == t:
            break
        t = t2
    t = re.sub(r"\{\{|\}\}", "", t)

    def link(m: re.Match[str]) -> str:
        inner = m.group(1)
        if _LINK_DROP_PREFIX.match(inner):
            return ""
        target, _, label = inner.partition("|")
        out = label if label else target
        return out.split("#", 1)[0] if not label and "#" in out and not out.startswith("#") else out.lstrip("#")

    for _ in range(20):
        t2 = _INNER_LINK.sub(link, t)
        if t2 == t:
            break
        t = t2
    t = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?|ftp)://[^\s\]]*\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)  # remaining tags: keep their content
    t = html.unescape(t).replace("\xa0", " ")
    t = re.sub(r"__[A-Z]+__", "", t)

    paragraphs: list[str] = []
    current: list[str] = []
    dropping = False
    drop_level = 0

    def flush() -> None:
        if current:
            para = " ".join(current)
            para = re.sub(r"\(\s*[,;:]?\s*\)", "", para)
            para = re.sub(r"[ \t]{2,}", " ", para)
            para = re.sub(r"\s+([,.;:])", r"\1", para).strip()
            if len(para) > 1:
                paragraphs.append(para)
            current.clear()

    for line in t.split("\n"):
        s = line.strip()
        h = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", s)
        if h:
            flush()
            level, heading = len(h.group(1)), h.group(2).strip()
            if dropping and level > drop_level:
                continue
            dropping = heading.lower() in _DROP_SECTIONS
            drop_level = level
            if not dropping and heading:
                paragraphs.append(heading)
            continue
        if dropping:
            continue
        if not s:
            flush()
            continue
        if s[0] in "|!" or s.startswith("{|") or s.startswith("|}"):
            continue
        if s[0] in "*#:;":
            flush()
            item = s.lstrip("*#:; ").strip()
            if item:
                current.append(item)
                flush()
            continue
        current.append(s)
    flush()
    return "\n\n".join(paragraphs)


def wiki_articles(dump_bz2: bytes, min_chars: int = 500) -> list[tuple[str, str]]:
    """(title, plain text document) for every article with enough prose to be worth training on."""
    out = []
    for title, raw in iter_wiki_pages(dump_bz2):
        body = clean_wikitext(raw)
        if len(body) >= min_chars:
            out.append((title, f"{title}\n\n{body}\n"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Corpus


def _code_document(relpath: str, text: str) -> str:
    """The same header in training and evaluation text, so evaluation measures the model on familiar framing."""
    return f"# file: {relpath}\n{text}"


def _resolve_sources(sources: Iterable[str] | None) -> tuple[list[str], set[str]]:
    if sources is None:
        return list(DEFAULT_SOURCES), set(OPTIONAL_BY_DEFAULT)
    names = list(dict.fromkeys(sources))
    unknown = [s for s in names if s not in KNOWN_SOURCES]
    if unknown:
        raise PonderError(f"unknown corpus source {unknown[0]!r}; known: {', '.join(sorted(KNOWN_SOURCES))}")
    if not names:
        raise PonderError("no corpus sources given")
    return names, set()


def build_corpus(
    out_dir: Path,
    sources: list[str] | None = None,
    *,
    stdlib_dir: Path | None = None,
    docs_dir: Path | None = None,
    wiki_dump: Path | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Write ``corpus.txt`` and ``manifest.json`` to ``out_dir`` and return the manifest.

    ``sources=None`` means stdlib + pydocs + wikipedia with pydocs optional (skipped with a note when the Debian
    package is absent). Naming sources explicitly makes every one of them required. The directory/file arguments
    exist so tests and other machines can point at their own copies; ``wiki_dump`` may be a gensim wheel, a
    ``.bz2`` dump or an ``.xml`` file. Held-out modules and articles never reach ``corpus.txt``.
    """
    out_dir = Path(out_dir)
    names, optional = _resolve_sources(sources)
    docs: list[str] = []
    used: dict[str, dict] = {}
    heldout: dict[str, list[str]] = {"stdlib": [], "wikipedia": []}
    skipped: dict[str, str] = {}

    heldout_modules: set[str] = set()
    if "stdlib" in names:
        root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
        files = list_stdlib_files(root)
        train_files, nbytes = [], 0
        for rel in files:
            if is_heldout_module(rel):
                heldout["stdlib"].append(rel)
                heldout_modules |= _module_names(rel)
                continue
            text = _read_text(root / rel)
            if not text.strip():
                continue
            doc = _code_document(rel, text)
            docs.append(doc)
            train_files.append(rel)
            nbytes += len(doc.encode("utf-8"))
        if not train_files:
            raise PonderError(f"stdlib source is empty: no .py files under {root}")
        used["stdlib"] = {"root": str(root), "documents": len(train_files), "bytes": nbytes,
                          "python": sys.version.split()[0], "files": train_files}

    if "pydocs" in names:
        root = Path(docs_dir) if docs_dir is not None else find_docs_dir()
        if root is None or not root.is_dir():
            if "pydocs" in optional:
                where = root or DEFAULT_DOCS_DIRS[0]
                note = f"pydocs skipped: {where} not found (apt-get install python3.11-doc to include it)"
                print(f"note: {note}", file=sys.stderr)
                skipped["pydocs"] = note
            else:
                raise PonderError(f"pydocs source not found: {root or DEFAULT_DOCS_DIRS[0]} "
                                  "(apt-get install python3.11-doc)")
        else:
            files = list_doc_files(root)
            train_files, excluded, nbytes = [], [], 0
            for rel in files:
                # A held-out module's reference page shares doctest examples with its docstrings: drop it too.
                if _doc_page_module(rel) in heldout_modules:
                    excluded.append(rel)
                    continue
                text = _read_text(root / rel)
                if not text.strip():
                    continue
                docs.append(text)
                train_files.append(rel)
                nbytes += len(text.encode("utf-8"))
            if not train_files:
                raise PonderError(f"pydocs source is empty: no .txt files under {root}")
            used["pydocs"] = {"root": str(root), "documents": len(train_files), "bytes": nbytes,
                              "files": train_files, "excluded_with_heldout_modules": excluded}

    if "wikipedia" in names:
        dump = read_wiki_dump(Path(wiki_dump)) if wiki_dump is not None else fetch_wiki_dump(cache_dir)
        articles = wiki_articles(dump)
        titles, nbytes = [], 0
        for title, doc in articles:
            if is_heldout_article(title):
                heldout["wikipedia"].append(title)
                continue
            docs.append(doc)
            titles.append(title)
            nbytes += len(doc.encode("utf-8"))
        if not titles:
            raise PonderError("wikipedia source is empty: no articles with prose in the dump")
        used["wikipedia"] = {"origin": str(wiki_dump) if wiki_dump else f"pip download {GENSIM_REQUIREMENT}",
                             "dump_member": GENSIM_WIKI_MEMBER, "dump_sha256": hashlib.sha256(dump).hexdigest(),
                             "documents": len(titles), "bytes": nbytes, "titles": titles}

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = out_dir / CORPUS_FILE
    sha = hashlib.sha256()
    with open(corpus_path, "w", encoding="utf-8", newline="\n") as f:
        for i, doc in enumerate(docs):
            piece = doc if i == 0 else EOT + doc
            f.write(piece)
            sha.update(piece.encode("utf-8"))
    manifest = {
        "format": "ponder-corpus-v1",
        "corpus_file": CORPUS_FILE,
        "separator": EOT,
        "documents": len(docs),
        "bytes": corpus_path.stat().st_size,
        "sha256": sha.hexdigest(),
        "sources_requested": names,
        "sources_used": [n for n in names if n in used],
        "sources_skipped": skipped,
        "sources": used,
        "heldout": {
            "rule": {"stdlib": f"sha1('{CODE_HELDOUT_SALT}:'+relpath) < {CODE_HELDOUT_FRACTION}",
                     "wikipedia": f"sha1('{PROSE_HELDOUT_SALT}:'+title) < {PROSE_HELDOUT_FRACTION}"},
            "stdlib": heldout["stdlib"],
            "wikipedia": heldout["wikipedia"],
        },
    }
    _write_manifest(out_dir, manifest)
    return manifest


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def iter_documents(corpus_path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Documents of ``corpus.txt`` one at a time, reading in chunks so a large corpus never sits in memory."""
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise PonderError(f"corpus not found: {corpus_path}")
    buf = ""
    with open(corpus_path, encoding="utf-8", newline="") as f:
        while True:
            chunk = f.read(chunk_chars)
            if not chunk:
                break
            buf += chunk
            parts = buf.split(EOT)
            buf = parts.pop()
            yield from parts
    yield buf


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(corpus_path: Path, out_path: Path, vocab_size: int = 8192) -> None:
    """Train a byte-level BPE on the corpus documents and save it as ``tokenizer.json``.

    Byte-level with no prefix space and no normalizer, so any string (tabs, indentation, non-ASCII) decodes back
    exactly; ``<|endoftext|>`` is added first so it is id 0 and is never split. Trained on the documents, not the
    raw file, so the separator does not earn merges of its own.
    """
    if vocab_size < 300 or vocab_size > 65536:
        raise PonderError(f"vocab_size must be between 300 and 65536 (uint16 token files), got {vocab_size}")
    if not Path(corpus_path).is_file() or Path(corpus_path).stat().st_size == 0:
        raise PonderError(f"corpus not found or empty: {corpus_path}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(Path(corpus_path)), trainer=trainer)
    if tok.token_to_id(EOT) != 0:
        raise PonderError("tokenizer training did not put <|endoftext|> at id 0")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))


def load_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` saved by :func:`train_tokenizer`, with a one-line error if it is missing."""
    if not Path(path).is_file():
        raise PonderError(f"tokenizer not found: {path}")
    return Tokenizer.from_file(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Token files


def is_val_document(doc: str, val_fraction: float) -> bool:
    """Chosen by content hash so the split survives reordering of sources and needs no stored index."""
    return _unit_hash(VAL_SALT, hashlib.sha1(doc.encode("utf-8")).hexdigest()) < val_fraction


def tokenize_corpus(corpus_path: Path, tokenizer_path: Path, out_dir: Path, val_fraction: float = 0.005,
                    batch_docs: int = 64) -> dict:
    """Write ``train.bin`` / ``val.bin`` (flat little-endian uint16 token ids, each document followed by id 0).

    The split is by whole documents, chosen by a hash of the document text, so validation never shares a
    document with training. Documents are encoded in small batches and appended to disk, keeping memory flat.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PonderError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(Path(tokenizer_path))
    if tok.get_vocab_size() > 65536:
        raise PonderError("tokenizer vocabulary does not fit uint16 token files")
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:
        raise PonderError(f"tokenizer {tokenizer_path} has no {EOT} token")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    total_bytes = 0
    last_train_doc: str | None = None

    with open(out_dir / "train.bin", "wb") as ftrain, open(out_dir / "val.bin", "wb") as fval:
        files = {"train": ftrain, "val": fval}

        def flush(batch: list[tuple[str, str]]) -> None:
            encs = tok.encode_batch([d for _, d in batch], add_special_tokens=False)
            for (split, _), enc in zip(batch, encs):
                ids = np.asarray(enc.ids + [eot_id], dtype=np.uint16)
                ids.tofile(files[split])
                counts[split]["documents"] += 1
                counts[split]["tokens"] += int(ids.size)

        batch: list[tuple[str, str]] = []
        for doc in iter_documents(Path(corpus_path)):
            if not doc:
                continue
            total_bytes += len(doc.encode("utf-8"))
            split = "val" if is_val_document(doc, val_fraction) else "train"
            if split == "train":
                last_train_doc = doc
            batch.append((split, doc))
            if len(batch) >= batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)

    if counts["train"]["documents"] == 0:
        raise PonderError(f"corpus {corpus_path} has no training documents")
    if val_fraction > 0 and counts["val"]["documents"] == 0 and counts["train"]["documents"] > 1:
        # Tiny corpora: move the last training document to val so a validation split always exists.
        enc = tok.encode(last_train_doc or "", add_special_tokens=False)
        ids = np.asarray(enc.ids + [eot_id], dtype=np.uint16)
        train = np.fromfile(out_dir / "train.bin", dtype=np.uint16)
        train[: train.size - ids.size].tofile(out_dir / "train.bin")
        ids.tofile(out_dir / "val.bin")
        counts["train"]["documents"] -= 1
        counts["train"]["tokens"] -= int(ids.size)
        counts["val"] = {"documents": 1, "tokens": int(ids.size)}

    result = {
        "tokenizer": str(Path(tokenizer_path).name),
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id,
        "dtype": "uint16",
        "val_fraction": val_fraction,
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "train_documents": counts["train"]["documents"],
        "val_documents": counts["val"]["documents"],
        "bytes_per_token": round(total_bytes / max(1, counts["train"]["tokens"] + counts["val"]["tokens"]), 4),
    }
    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["tokens"] = result
        _write_manifest(out_dir, manifest)
    return result


def build_all(out_dir: Path, vocab_size: int = 8192, sources: list[str] | None = None, **source_dirs) -> dict:
    """Corpus, tokenizer and token files in one directory: everything the reference-model recipe reads."""
    out_dir = Path(out_dir)
    manifest = build_corpus(out_dir, sources, **source_dirs)
    train_tokenizer(out_dir / CORPUS_FILE, out_dir / TOKENIZER_FILE, vocab_size=vocab_size)
    tokenize_corpus(out_dir / CORPUS_FILE, out_dir / TOKENIZER_FILE, out_dir)
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest["tokenizer_sha256"] = hashlib.sha256((out_dir / TOKENIZER_FILE).read_bytes()).hexdigest()
    _write_manifest(out_dir, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation data

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

    Uses the same selection functions as :func:`build_corpus`, so nothing written here can be in the training
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ponder.train.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (corpus.txt, tokenizer.json, *.bin)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sources", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_SOURCES)}")
    p.add_argument("--wiki-dump", type=Path, default=None, help="local gensim wheel or .bz2 dump (skips pip)")
    p.add_argument("--eval", action="store_true", help="also (re)write the evaluation files to data/eval")
    args = p.parse_args(argv)
    try:
        m = build_all(args.out, vocab_size=args.vocab_size, sources=args.sources, wiki_dump=args.wiki_dump,
                      cache_dir=args.out / "cache")
        if args.eval:
            build_eval(Path("data/eval"), wiki_dump=args.wiki_dump, cache_dir=args.out / "cache")
    except PonderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = m.get("tokens", {})
    print(f"corpus {m['bytes']} bytes, {m['documents']} documents, sources {', '.join(m['sources_used'])}; "
          f"train {t.get('train_tokens')} tokens, val {t.get('val_tokens')} tokens; sha256 {m['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
