"""The training corpus's sources, read from what a fresh machine can get, and the held-out rule over their items.

Why this module exists: a benchmark of token-adaptive inference is only honest if the reference model was trained
on data we can name and rebuild byte for byte, and if the evaluation text was never seen in training. Everything
here is therefore deterministic (sorted file lists, fixed hash-based selections, pinned downloads), and the
builders record what they used in ``manifest.json``. The held-out selection is a pure function of an item's *name*
(a stdlib path or a Wikipedia title), so the training builder (:mod:`.corpus`) and the evaluation builder
(:mod:`.probes`) cannot disagree about it, whichever Python interpreter or machine runs them.

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

import bz2
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import PonderError

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
# Documents


def _code_document(relpath: str, text: str) -> str:
    """The same header in training and evaluation text, so evaluation measures the model on familiar framing."""
    return f"# file: {relpath}\n{text}"
