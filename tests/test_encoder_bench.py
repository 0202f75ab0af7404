"""The embed bench on a tiny random encoder: rows, A/A control, resumption, report; and the retrieval metrics."""

from __future__ import annotations

import json

import pytest
import torch

from ponder.encoders.bench import CONTROL, EmbedBench, EmbedSettings, parse_policy
from ponder.encoders.retrieval import overlap_at_k, rank_topk, recall_at_k, rst_paragraphs, sentences
from test_encoder import tiny_encoder


def test_retrieval_metrics():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    p = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0]]), dim=-1)
    top = rank_topk(q, p, 2)
    assert top.tolist() == [[0, 2], [1, 2]]
    assert recall_at_k(top, torch.tensor([2, 0])) == 0.5
    assert overlap_at_k(top, torch.tensor([[2, 0], [0, 1]])) == 0.75


def test_rst_prose_extraction():
    src = ("Title\n=====\n\nSome :func:`os.path.join` text with ``code`` and a `link <http://x>`_ here.\n"
           "It goes on::\n\n    not_prose()\n\n.. note::\n\n   A directive.\n\n>>> 1 + 1\n2\n\nBack to prose.\n")
    paras = rst_paragraphs(src)
    assert paras == ["Some os.path.join text with code and a link here. It goes on:", "Back to prose."]
    assert sentences("One e.g. two. Three is here. Four!") == ["One e.g. two.", "Three is here.", "Four!"]


def test_parse_policy_spec():
    assert parse_policy("token-prune:score=norm;layers=1/2") == ("token-prune", {"score": "norm", "layers": (1, 2)})
    assert parse_policy("layer-skip") == ("layer-skip", {})


def test_embed_bench_rows_resume_and_report(tmp_path):
    _, folder = tiny_encoder(tmp_path, "bert", layers=2)
    s = EmbedSettings(queries=12, passages=40, timing_texts_b32=8, timing_texts_b1=2, repeats=1, warmup=0,
                      min_timed_s=0.0, profile="test")
    out = tmp_path / "bench"
    pols = ["token-merge:merge_ratio=0.2", "layer-skip:skip_layers=1"]
    summary = EmbedBench(str(folder), s, out, show_progress=False).run(pols, [0.8, 1.0])
    assert summary["written"] == 4 and not summary["failed"]  # dense, control, two policies (budget 1 = dense)
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    by = {r["policy"]: r for r in rows}
    assert by["dense"]["cos_mean"] == pytest.approx(1.0) and by["dense"]["overlap_at_10"] == 1.0
    assert by[CONTROL]["speedup_b32"] > 0 and "control_ok" in by[CONTROL]
    sc = by["dense"]["stage_cos"]
    assert len(sc) == 4 and sc[-1]["raw_cos"] == pytest.approx(1.0, abs=1e-5)  # the last state is the embedding
    m = by["token-merge:merge_ratio=0.2"]
    for k in ("flops_fraction", "cos_mean", "cos_p1", "recall_at_10", "overlap_at_10", "speedup_b32",
              "speedup_b1", "texts_per_s_b32", "texts_per_s_b1", "speedup_b32_range", "env", "loadavg_before"):
        assert m.get(k) is not None, k
    assert m["flops_fraction"] < 1.0 and m["real"] is True
    assert by["layer-skip:skip_layers=1"]["flops_fraction"] == pytest.approx(0.5, abs=1e-6)
    again = EmbedBench(str(folder), s, out, show_progress=False).run(pols, [0.8], write_report=False)
    assert again["written"] == 0 and again["skipped"] == 2
    md = (out / "report.md").read_text()
    assert "A/A control" in md and "| token-merge:merge_ratio=0.2 | 0.8 |" in md and "Pruning vs merging" in md
    assert "<svg" in (out / "report.html").read_text() and "Why tokens cannot leave early" in md
