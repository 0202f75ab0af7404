"""The CLI contract the benchmark and users rely on, on the shipped model, plus one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ponder.cli import main

REF = Path(__file__).resolve().parents[1] / "models" / "ref"
needs_ref = pytest.mark.skipif(not (REF / "model.safetensors").is_file(), reason="models/ref not present")


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@needs_ref
def test_generate_json(capsys):
    rc, out, _ = run(capsys, "generate", "--model", "ref", "--prompt", "def main():\n", "--max-new-tokens", "8",
                     "--json", "--ignore-eos")
    assert rc == 0
    obj = json.loads(out)
    assert len(obj["token_ids"]) == 8 and isinstance(obj["text"], str)
    assert obj["stats"]["flops_fraction"] == pytest.approx(1.0)
    # every token that went through the model (prompt + all generated but the last) used every layer
    layers = json.loads((REF / "config.json").read_text())["num_hidden_layers"]
    assert obj["layers_per_token"] == [layers] * (obj["prompt_tokens"] + 7)


@needs_ref
def test_generate_streams_human_output(capsys):
    rc, out, err = run(capsys, "generate", "--model", "ref", "--prompt", "import os\n", "--max-new-tokens", "6",
                       "--ignore-eos")
    assert rc == 0 and out.startswith("import os\n") and "tokens" in err


@needs_ref
def test_eval_json(capsys, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("def add(a, b):\n    return a + b\n\n" * 20)
    rc, out, _ = run(capsys, "eval", "--model", "ref", "--data", str(f), "--json")
    obj = json.loads(out)
    assert rc == 0 and obj["flops_fraction"] == pytest.approx(1.0)
    assert obj["perplexity"] > 1 and obj["bits_per_byte"] > 0 and obj["tokens_scored"] > 100


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["eval", "--data", "/no/such/file.txt"], "not found"),
    (["train", "nonsense"], "unknown training kind 'nonsense'"),
    (["train", "translators", "--model", "/no/such/dir"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


@needs_ref
@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "ref", "--prompt", "x", "--policy", "nope"], "unknown policy"),
    (["generate", "--model", "ref", "--prompt", "x", "--budget", "1.5"], "budget must be in (0, 1]"),
    (["generate", "--model", "ref", "--prompt", "x" * 4000], "exceeds the model's context"),
    (["generate", "--model", "ref", "--chat", "hi"], "has no chat template"),
    (["generate", "--model", "ref", "--prompt", "x", "--chat", "hi"], "exactly one of"),
    (["generate", "--model", "ref", "--chat-file", "/no/such.json"], "does not exist"),
])
def test_bad_policy_budget_prompt(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_empty_and_binary_data_files(capsys, tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00abc")
    for name, msg in (("e.txt", "is empty"), ("b.txt", "not valid UTF-8")):
        rc, _, err = run(capsys, "eval", "--data", str(tmp_path / name))
        assert rc == 2 and msg in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "policies", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and any(p["policy"] == "dense" for p in json.loads(r.stdout))
    ee = next(p for p in json.loads(r.stdout) if p["policy"] == "early-exit")
    assert ee["params"]["kv_fill"] == "state"  # users can see what a variant spec may set


@needs_ref
def test_quantize_runs_the_shipped_model_natively_and_refuses_native_on_floats(capsys):
    """`--quantize` makes the block layouts from any float checkpoint (here `ref`); `--weights native` on float
    weights says what to add instead."""
    rc, out, _ = run(capsys, "generate", "--model", "ref", "--prompt", "def main():\n", "--max-new-tokens", "6",
                     "--json", "--ignore-eos", "--quantize", "q4_1")
    assert rc == 0
    obj = json.loads(out)
    assert len(obj["token_ids"]) == 6 and obj["weights"].startswith("native Q8_0 (embedding), Q4_1 (layers)")
    rc, _, err = run(capsys, "generate", "--model", "ref", "--prompt", "x", "--weights", "native")
    assert rc == 2 and "--quantize" in err and len(err.strip().splitlines()) == 1
