"""Tiny random models of every supported family, built with transformers (the oracle) and saved as HF folders."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def available_isas(mod) -> list[str]:
    """The instruction sets the compiled kernels accept on this CPU (each forced in turn by the kernel tests)."""
    if mod is None:
        return []
    out = []
    for name in ("scalar", "avx2", "avx512", "avx512vnni"):
        try:
            mod.set_isa(name)
            out.append(name)
        except ValueError:
            pass
    mod.set_isa("auto")
    return out


def hf_config(family: str, layers: int = 4, tie: bool = False):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "llama3":
        return tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    raise ValueError(family)


def hf_model(family: str, layers: int = 4, tie: bool = False, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, layers, tie)
    cls = {"llama": tf.LlamaForCausalLM, "llama3": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM}[family]
    m = cls(cfg).eval()
    with torch.no_grad():  # transformers initialises biases and norms to trivial values; make them matter
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def write_tokenizer(path) -> None:
    """A byte-level BPE tokenizer with the tiny models' vocabulary size (97)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=97, special_tokens=["<pad>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the cat sat on the mat. def f(x): return x + 1"] * 20, tr)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama checkpoint folder (safetensors + tokenizer.json), the oracle model beside it."""
    cache = {}

    def make(family: str = "llama", layers: int = 4, tie: bool = False):
        key = (family, layers, tie)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}{layers}{'t' if tie else ''}")
            m = hf_model(family, layers, tie)
            m.save_pretrained(d, safe_serialization=True)
            write_tokenizer(d)
            cache[key] = (d, m)
        return cache[key]

    return make


# ---- shared by the policy tests (tests/policies/) -----------------------------------------------------------------
# Token-id calibration sequences for the tiny models (tests never need data/calib.txt), and the tolerance for
# "equals dense" between two float32 paths that sum in different orders.
CALIB = torch.randint(3, 97, (6, 40), generator=torch.Generator().manual_seed(21)).tolist()
TOL = 1e-4


# Between two paths on block-quantised weights whose activations differ in the last float32 bits (attention summed in
# another order): the kernels round each activation to one of 255 levels per 32-value block, so such a difference can
# move one activation by a whole level (max|x| / 127 of its block) and an output by that level times its weights.
TOL_Q = 1e-2


def tol(engine) -> float:
    return TOL_Q if engine.quantised else TOL


@pytest.fixture(scope="session")
def eng(tiny_folder):
    """The tiny random 8-layer Llama every policy test runs on."""
    import ponder.api as api

    return api.load(tiny_folder("llama", layers=8)[0])


@pytest.fixture(scope="session")
def qeng(tiny_folder):
    """The same model quantised (Q4_1 layers, Q8_0 embedding) and run by the block kernels."""
    import ponder.api as api

    return api.load(tiny_folder("llama", layers=8)[0], quantize="q4_1")


def score_stats(eng, pol, ids):
    """Logits of a scoring pass under ``pol`` and the engine's counters of what ran."""
    from ponder.engine import Stats

    st = Stats(eng.cfg)
    out = eng.forward(ids, planner=pol.planner(eng), stats=st, phase="score").logits
    return out, st
