"""The long-context bench on the tiny shipped model: every section runs, rows are written as they go, a rerun resumes,
the probes hold their facts; bad input gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ponder import api
from ponder.cli import main
from ponder.eval import longctx
from ponder.eval.points import repo_data

REF = Path(__file__).resolve().parents[1] / "models" / "ref"
needs_ref = pytest.mark.skipif(not (REF / "model.safetensors").is_file(), reason="models/ref not present")


@needs_ref
def test_bench_long_smoke_writes_every_section_and_resumes(tmp_path, capsys):
    out = tmp_path / "long"
    assert main(["bench-long", "--model", "ref", "--profile", "smoke", "--out", str(out), "--no-kvpress",
                 "--json"]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["section"] for r in rows} == {"quality", "retrieval", "prefill", "timing"}
    q = [r for r in rows if r["section"] == "quality"]
    assert len(q) == 2 * (1 + 10 * 2)  # two texts, dense + ten policies at two fractions
    dense = next(r for r in q if r["policy"] == "dense" and r["text"] == "prose")
    assert dense["delta_pct"] == 0 and dense["kv_tokens_after_context"] == 96
    half = next(r for r in q if r["policy"] == "snapkv" and r["kept"] == 0.5 and r["text"] == "prose")
    assert half["kv_tokens_after_context"] == 48
    t = [r for r in rows if r["section"] == "timing"]
    assert {r["policy"] for r in t} == {"dense", "snapkv"}
    assert next(r for r in t if r["policy"] == "snapkv")["kv_bytes"] < next(r for r in t if r["policy"] ==
                                                                             "dense")["kv_bytes"]
    report = (out / "report.md").read_text()
    assert "## Quality" in report and "## Retrieval" in report and "## Time" in report
    capsys.readouterr()
    assert main(["bench-long", "--model", "ref", "--profile", "smoke", "--out", str(out), "--no-kvpress",
                 "--json"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)  # resumed: nothing redone
    # a policy missing from a timing group is timed against a dense run of its own; dense is not written twice
    kept = [json.dumps(r) for r in rows if not (r["section"] == "timing" and r["policy"] == "snapkv")]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    assert main(["bench-long", "--model", "ref", "--profile", "smoke", "--out", str(out), "--no-kvpress",
                 "--json", "--sections", "timing"]) == 0
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    t2 = [r for r in again if r["section"] == "timing"]
    assert sorted(r["policy"] for r in t2) == ["dense", "snapkv"] and "dense_decode_s_per_token" in t2[-1]


@needs_ref
def test_probes_hold_their_facts_near_the_asked_length():
    e = api.load("ref")
    prose = repo_data("prose.txt").read_text()
    for variant, n_facts in (("single", 1), ("multikey", 3), ("twohop", 2)):
        ps = longctx.probes(e, prose, 200, (0.1, 0.9), variant)
        for p in ps:
            text = e.tokenizer.decode(p["context"])
            assert text.count("The secret code of") == n_facts
            assert p["answer"] in text
            assert 150 <= len(p["context"]) + len(p["question"]) <= 205  # whole sentences: a little under
        first, last = (e.tokenizer.decode(p["context"]).index("secret code") for p in ps)
        assert first < last  # depth 0.1 puts the fact earlier than depth 0.9


def test_bad_profile_and_section_are_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench-long", "--profile", "huge"])
    capsys.readouterr()
    if (REF / "model.safetensors").is_file():
        assert main(["bench-long", "--model", "ref", "--sections", "speed"]) == 2
        assert "unknown section 'speed'" in capsys.readouterr().err


@needs_ref
def test_a_profile_longer_than_the_model_window_is_refused(capsys):
    assert main(["bench-long", "--model", "ref", "--profile", "quick", "--out", "/tmp/x-never"]) == 2
    assert "window is 256" in capsys.readouterr().err
