"""Training corpus, tokenizer and held-out evaluation data, all rebuilt from sources a fresh machine can get.

This module builds the training side, from the sources and held-out rule of :mod:`.sources`: ``corpus.txt`` and
``manifest.json`` (:func:`build_corpus`), the byte-level BPE ``tokenizer.json`` (:func:`train_tokenizer`) and the
``train.bin`` / ``val.bin`` token files (:func:`tokenize_corpus`); :func:`build_all` runs all three. The held-out
evaluation files are :mod:`.probes`' (``python -m ponder.train.corpus --eval`` writes them too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import PonderError
from .probes import build_eval
from .sources import (
    CODE_HELDOUT_FRACTION,
    CODE_HELDOUT_SALT,
    DEFAULT_DOCS_DIRS,
    DEFAULT_SOURCES,
    EOT,
    GENSIM_REQUIREMENT,
    GENSIM_WIKI_MEMBER,
    KNOWN_SOURCES,
    OPTIONAL_BY_DEFAULT,
    PROSE_HELDOUT_FRACTION,
    PROSE_HELDOUT_SALT,
    _code_document,
    _doc_page_module,
    _module_names,
    _read_text,
    _unit_hash,
    default_stdlib_dir,
    fetch_wiki_dump,
    find_docs_dir,
    is_heldout_article,
    is_heldout_module,
    list_doc_files,
    list_stdlib_files,
    read_wiki_dump,
    wiki_articles,
)

# The validation split; like the held-out salts (.sources), the salt is part of the definition.
VAL_SALT = "ponder-val-v1"

CORPUS_FILE = "corpus.txt"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Corpus


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ponder.train.corpus", description=__doc__.split("\n\n")[0])
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
