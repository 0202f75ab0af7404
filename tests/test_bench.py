"""The bench harness: timing rules, the two baseline policies, quality metrics, results files and the CLI.

Everything runs on the tiny random models of conftest.py; nothing asserts a timing, only that timings are taken
the way the harness promises (interleaved, warm-up discarded, one row per point, resumable, refusing bad input).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import ponder.api as api
from ponder.cli import main as cli_main
from ponder.engine import SamplingConfig, generate
from ponder.errors import PonderError
from ponder.eval import quality, sweep, timing
from ponder.eval.envinfo import environment, model_fingerprint
from ponder.policies import registry
from ponder.policies.layer_drop import LayerDrop

CODE = ("def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n")


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory):
    """Tiny Llama checkpoints whose vocabulary covers the test tokenizer (259 ids), so they can read real text."""
    import transformers as tf

    from conftest import write_tokenizer

    cache = {}

    def make(layers: int = 6, seed: int = 0):
        if (layers, seed) not in cache:
            torch.manual_seed(seed)
            cfg = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
            d = tmp_path_factory.mktemp(f"text{layers}_{seed}")
            tf.LlamaForCausalLM(cfg).eval().save_pretrained(d, safe_serialization=True)
            write_tokenizer(d)
            cache[(layers, seed)] = d
        return cache[(layers, seed)]

    return make


# ---- timing ------------------------------------------------------------------------------------------------------

def test_interleaved_rounds_rotate_and_discard_warmup():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    t = timing.interleaved(fns, warmup=2, repeats=3)
    assert len(calls) == 3 * 5  # every round runs every function
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"]  # who goes first rotates
    for v in t.values():
        assert len(v["samples"]) == 3 and v["min"] <= v["median"] <= v["max"]


def test_interleaved_uses_self_measured_seconds_and_min_time():
    import time

    t = timing.interleaved({"x": lambda: 0.25, "y": lambda: 0.5}, warmup=0, repeats=2)
    assert t["x"]["median"] == 0.25 and t["y"]["median"] == 0.5  # the part each call measured itself
    assert timing.paired_ratio(t["y"], t["x"])["median"] == 2.0
    t = timing.interleaved({"x": lambda: time.sleep(0.01), "y": lambda: time.sleep(0.005)}, warmup=0, repeats=2,
                           min_seconds=0.05, max_repeats=50)
    n = len(t["x"]["samples"])
    assert n < 50 and n == len(t["y"]["samples"])
    # rounds are added until every side ran 0.05 s, and not one round more (sleep overshoot varies with load, so
    # the count itself is not fixed; the stopping rule is)
    assert min(sum(t[k]["samples"]) for k in "xy") >= 0.0495
    assert min(sum(t[k]["samples"][:-1]) for k in "xy") < 0.0505
    assert t["x"]["min"] >= 0.01


def test_environment_and_fingerprint(tiny_folder, tmp_path):
    env = environment("cpu", torch.float32)
    for k in ("cpu", "torch_threads", "torch", "dtype", "device", "attention", "ponder"):
        assert env.get(k) not in (None, ""), k
    folder, _ = tiny_folder("llama")
    a = model_fingerprint(folder)
    b = model_fingerprint(tiny_folder("llama", layers=6)[0])
    assert a["model_sha256"] != b["model_sha256"] and a == model_fingerprint(folder)


# ---- quality metrics -------------------------------------------------------------------------------------------

def test_quality_metrics_against_dense_itself(tiny_folder):
    eng = api.load(tiny_folder("llama")[0])
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = quality.LogitReference.build(eng, quality.cut_windows(ids, 64, 200))
    same = quality.logit_agreement(eng, registry.get("dense"), ref)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["kl_tokens"] == 200
    drop = quality.logit_agreement(eng, LayerDrop(budget=0.5, dropped=[1, 2]), ref)
    assert drop["kl"] > 1e-4 and all(f == pytest.approx(0.5) for f in drop["window_flops_fractions"])
    prompts = quality.cut_prompts(ids, 3, 10)
    g = quality.greedy(eng, None, prompts, 6)
    assert quality.exact_match(g.tokens, g.tokens) == {"greedy_exact_match": 1.0, "first_divergence": 6.0,
                                                       "greedy_new_tokens": 6}
    other = [t[:2] + [(t[2] + 1) % 97] + t[3:] for t in g.tokens]
    assert quality.exact_match(g.tokens, other)["first_divergence"] == 2.0
    assert len(g.layers[0]) == 10 + 6 - 1 and set(g.layers[0]) == {4}


def test_probe_rule_exact_prefix(text_folder):
    eng = api.load(text_folder())
    prompt = "def f(x): return x"
    ids = eng.tokenizer.encode(prompt)
    out = generate(eng, [ids], SamplingConfig(max_new_tokens=16)).tokens[0]
    text = eng.tokenizer.decode(out)
    assert len(text) >= 5
    good = {"prompt": prompt, "answer": text[:5], "kind": "line"}
    bad = {"prompt": prompt, "answer": text[:5] + "\u00e9", "kind": "identifier"}
    r = quality.probe_accuracy(eng, None, [good, bad])
    assert r["probe_correct"] == [True, False] and r["probe_by_kind"] == {"identifier": 0.0, "line": 1.0}


# ---- results files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "abc", "", "nan"])
def test_budget_list_rejects_values_outside_unit_interval(bad):
    with pytest.raises(PonderError):
        sweep.parse_budgets(f"1,{bad}" if bad else "")


def test_results_file_appends_resumes_and_refuses_other_models(tmp_path):
    rf = sweep.ResultsFile(tmp_path, {"model_sha256": "aaa"})
    row = {"task": "lm", "policy": "random", "budget": 0.5, "settings": "s1", "model_sha256": "aaa", "x": float("nan")}
    rf.append(row)
    with open(rf.path, "ab") as f:  # a crash in the middle of writing the next line
        f.write(b'{"task": "lm", "policy": "layer-dr')
    again = sweep.ResultsFile(tmp_path, {"model_sha256": "aaa"})
    assert again.has(sweep.point_key(row)) and again.rows[0]["x"] is None
    again.append({**row, "budget": 0.75})
    lines = rf.path.read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith('{"task": "lm", "policy": "layer-dr')  # kept, never rewritten
    assert [r["budget"] for r in sweep.read_rows(tmp_path, warn=False)] == [0.5, 0.75]
    with pytest.raises(PonderError, match="another model"):
        sweep.ResultsFile(tmp_path, {"model_sha256": "bbb"})


# ---- the bench end to end on a tiny model ------------------------------------------------------------------------

TINY = ["--tokens", "200", "--kl-tokens", "100", "--prompts", "2", "--new-tokens", "4", "--probes", "2",
        "--repeats", "1", "--warmup", "0", "--batch", "2", "--prose", "none", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_bench(text_folder, tmp_path_factory):
    folder = text_folder(6)
    d = tmp_path_factory.mktemp("bench")
    data = d / "code.txt"
    data.write_text(CODE * 20)
    out = d / "out"
    args = ["bench", "--model", str(folder), "--policies", "dense,random,layer-drop", "--budgets", "0.5",
            "--data", str(data), "--out", str(out), "--json", *TINY]
    return folder, data, out, args


def _rows(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_bench_writes_every_point_with_its_fields(tiny_bench, capsys):
    folder, data, out, args = tiny_bench
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = _rows(out)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"dense", "dense-control", "transformers-generate", "random", "layer-drop"}
    assert summary["written"] == 5 and not summary["failed"]
    for name in ("random", "layer-drop"):
        r = by[name]
        for k in ("policy", "budget", "perplexity", "perplexity_delta", "top1_agreement", "kl", "flops_fraction",
                  "decode_speedup", "prefill_speedup", "realization", "real", "kv_compatible", "batch_compatible",
                  "training_free", "model_sha256", "env", "timings", "greedy_exact_match", "first_divergence",
                  "probe_exact_match", "weight_bytes_fraction", "flops_fraction_std", "decode_speedup_b2",
                  "peak_memory_bytes", "kv_cache_bytes", "sample"):
            assert k in r, (name, k)
        assert r["budget"] == 0.5 and r["flops_fraction"] < 0.75
        assert r["timings"]["decode_b1"]["dense"]["min"] <= r["timings"]["decode_b1"]["dense"]["max"]
    d = by["dense"]
    assert d["kl"] == pytest.approx(0, abs=1e-6) and d["top1_agreement"] == 1.0 and d["greedy_exact_match"] == 1.0
    assert by["layer-drop"]["kv_written_fraction"] == pytest.approx(0.5)
    assert "control_ok" in by["dense-control"] and by["dense-control"]["decode_speedup"] > 0
    assert by["transformers-generate"]["greedy_exact_match"] == 1.0
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_bench_rerun_skips_finished_points_and_never_rewrites(tiny_bench, capsys):
    folder, data, out, args = tiny_bench
    if not (out / "results.jsonl").exists():
        assert cli_main(args) == 0
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 0 and (out / "results.jsonl").read_bytes() == before


def test_bench_measures_a_policy_variant_beside_the_default(tiny_bench, tmp_path, capsys):
    folder, data, out, args = tiny_bench
    a = list(args)
    a[a.index("--policies") + 1] = "random,random:seed=3"
    a[a.index("--out") + 1] = str(tmp_path / "variants")
    assert cli_main(a + ["--no-peer", "--no-report"]) == 0
    by = {r["policy"]: r for r in _rows(tmp_path / "variants")}
    v = by["random:seed=3"]
    assert (v["policy_name"] == "random" and v["policy_params"]["seed"] == 3
            and by["random"]["policy_params"]["seed"] == 0)
    assert v["flops_fraction"] < 0.75 and v["sample"] != by["random"]["sample"]  # another seed, other decisions


@pytest.mark.parametrize("change,msg", [
    (["--policies", "dense,nope"], "unknown policy 'nope'"),
    (["--policies", "random:nope=1"], "random has no parameter 'nope'"),
    (["--budgets", "1,1.5"], "outside (0, 1]"),
    (["--budgets", "0"], "outside (0, 1]"),
    (["--task", "nope"], "unknown --task"),
    ("empty", "is empty"),
    ("other-model", "another model"),
])
def test_bench_bad_input_is_one_clear_line(tiny_bench, text_folder, tmp_path, capsys, change, msg):
    folder, data, out, args = tiny_bench
    a = list(args)
    if change == "empty":
        empty = tmp_path / "empty.txt"
        empty.write_text("  \n")
        a[a.index("--data") + 1] = str(empty)
    elif change == "other-model":
        if not (out / "results.jsonl").exists():
            assert cli_main(args) == 0
        a[a.index("--model") + 1] = str(text_folder(6, seed=1))
    else:
        a += change
    before = (out / "results.jsonl").read_bytes() if (out / "results.jsonl").exists() else None
    capsys.readouterr()
    assert cli_main(a) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ponder: error:") and msg in err[0]
    if before is not None:
        assert (out / "results.jsonl").read_bytes() == before


def test_report_command_needs_results(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_quick_profile_covers_every_registered_policy():
    from ponder.eval.points import QUICK_BUDGETS, BenchSettings, default_policies, plan_points

    pts = plan_points(default_policies(), list(QUICK_BUDGETS))
    assert {p.policy for p in pts} >= set(registry.names()) - {"dense"}
    assert [p.budget for p in pts if p.policy == "self-speculative:drafter=lookup"] == [1.0]  # no budget to sweep
    q = BenchSettings.quick()
    assert q.profile == "quick" and q.ppl_tokens <= 4096 and q.prompts <= 8


_ = os


def test_policy_specs_parse_to_the_right_types():
    from ponder.encoders.policies import registry as enc
    from ponder.policies.spec import parse_policy

    assert parse_policy("token-prune:score=norm;layers=1/2") == ("token-prune", {"score": "norm", "layers": (1, 2)})
    assert registry.get("early-exit:kv_fill=none", 0.9).kv_fill == "none"  # the mode, not Python's None
    assert registry.get("self-speculative:draft_len=3;adaptive=false").draft_len == 3
    with pytest.raises(PonderError, match="token-prune has no parameter 'nope'"):
        enc.get("token-prune", 0.8, nope=1)
    with pytest.raises(PonderError, match="draft_len must be an integer or none, not '3x'"):
        registry.get("self-speculative:draft_len=3x")  # refused before any work, not a TypeError mid-sweep
    with pytest.raises(PonderError, match="adaptive must be true or false"):
        registry.get("self-speculative:adaptive=2")
