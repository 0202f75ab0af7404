"""The trained draft head (models.adapters.DraftHead, train/draft.py) in the speculative loop: lossless always."""

from __future__ import annotations

import pytest
import torch

import ponder.api as api
from conftest import CALIB
from ponder.engine import SamplingConfig
from ponder.engine.speculative import SpecConfig, speculative_generate
from ponder.errors import PonderError
from ponder.eval.prompts import KINDS, chat_requests
from ponder.models.adapters import DraftHead, fingerprint, load_draft_head, save_adapter, shipped_dir
from ponder.policies import registry
from ponder.train import draft as td
from ponder.train.translators import training_text


def _random_head(eng, seed=0, vocab=None) -> DraftHead:
    D, V = eng.cfg.hidden_size, eng.cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    voc = torch.arange(V) if vocab is None else vocab
    return DraftHead(torch.randn(32, 2 * D, generator=g) * 0.1, torch.zeros(32), torch.randn(D, 32, generator=g) * 0.1,
                     voc, eng.embed, eng.norm, eng.head[voc], eng.cfg.rms_norm_eps)


class _Oracle:
    """A drafter that knows the dense continuation: it finds the position whose dense final state is nearest the
    one it is given and proposes the dense tokens after it (or, ``wrong``, a different token every time)."""

    def __init__(self, eng, seq: list[int], wrong: bool):
        self.seq, self.wrong, self.V = seq, wrong, eng.cfg.vocab_size
        self.H = eng.forward(torch.tensor([seq]), logits=None, phase="score").hidden[0]
        self.vocab = torch.arange(self.V)
        D = eng.cfg.hidden_size
        self.w1, self.w2, self.head = torch.zeros(1, D), torch.zeros(1, D), torch.zeros(1, D)

    def step(self, f, x):
        t = int(torch.cdist(f, self.H).argmin())
        nxt = self.seq[t + 2] if t + 2 < len(self.seq) else 0
        if self.wrong:
            nxt = (nxt + 1) % self.V
        logits = torch.nn.functional.one_hot(torch.tensor([nxt]), self.V).float()
        return self.H[min(t + 1, len(self.H) - 1)][None], logits


@pytest.mark.parametrize("wrong", [False, True])
def test_an_always_right_draft_is_accepted_in_full_and_an_always_wrong_one_falls_back(eng, wrong):
    prompt = CALIB[0][:10]
    sc = SamplingConfig(max_new_tokens=20, stop_tokens=())
    dense = registry.get("dense").generate(eng, [prompt], sc).tokens[0]
    oracle = _Oracle(eng, prompt + dense, wrong)
    spec = SpecConfig(exit_layer=1, draft_len=4, max_draft=4, adaptive=False, drafter="head", draft_head=oracle)
    r = speculative_generate(eng, [prompt], sc, spec)
    assert r.tokens[0] == dense
    assert r.extra["acceptance_rate"] == (0.0 if wrong else 1.0)
    assert r.extra["rounds"] == (len(dense) - 1 if wrong else -(-(len(dense) - 1) // 5))


def test_speculation_with_any_draft_head_equals_dense_greedy(eng):
    prompts = [CALIB[1][:12], CALIB[2][:5]]
    sc = SamplingConfig(max_new_tokens=18, stop_tokens=())
    dense = registry.get("dense").generate(eng, prompts, sc).tokens
    for dh in (_random_head(eng, 1), _random_head(eng, 2, vocab=torch.arange(0, 97, 3))):
        for drafter in ("head", "lookup+head"):
            spec = SpecConfig(exit_layer=1, draft_len=3, drafter=drafter, draft_head=dh)
            assert speculative_generate(eng, prompts, sc, spec).tokens == dense


def test_sampling_with_a_draft_head_runs_and_is_seeded(eng):
    sc = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=5, stop_tokens=())
    spec = SpecConfig(exit_layer=1, draft_len=3, drafter="head", draft_head=_random_head(eng, 3))
    a = speculative_generate(eng, [CALIB[3][:8]], sc, spec).tokens
    b = speculative_generate(eng, [CALIB[3][:8]], sc, spec).tokens
    assert a == b and len(a[0]) == 12


def test_the_policy_needs_a_draft_head_and_refuses_another_bases(eng, tiny_folder, tmp_path):
    with pytest.raises(PonderError, match="no draft head is shipped"):
        registry.get("self-speculative", drafter="head").generate(eng, [CALIB[0][:5]], SamplingConfig(max_new_tokens=3))
    with pytest.raises(PonderError, match="does not draft with layers"):
        registry.get("self-speculative", 0.5, drafter="head")
    other = api.load(tiny_folder("llama", layers=8, tie=True)[0])
    p = tmp_path / "dh.safetensors"
    save_adapter(p, _random_head(other).tensors(), {"kind": "draft-head", "base_fingerprint": fingerprint(other.model)})
    with pytest.raises(PonderError, match="trained for another base model"):
        load_draft_head(p, eng.model, eng.embed, eng.norm, eng.head, eng.cfg.rms_norm_eps)
    pol = registry.get("self-speculative", drafter="head", head=str(p))
    out = pol.generate(other, [CALIB[0][:6]], SamplingConfig(max_new_tokens=8, stop_tokens=()))
    assert out.tokens == registry.get("dense").generate(other, [CALIB[0][:6]],
                                                       SamplingConfig(max_new_tokens=8, stop_tokens=())).tokens


def test_training_a_draft_head_lowers_its_loss(tmp_path):
    """End to end on the shipped ``ref`` model (its tokenizer matches its vocabulary)."""
    out = tmp_path / "dh" / "draft-head"
    card = td.train_draft_head("ref", out, tokens=2048, generated=160, vocab_size=64, hidden=32, epochs=3,
                               lr=3e-3, eval_tokens=512, progress=False)
    losses = card["training"]["epoch_losses"]
    assert losses[-1] < losses[0]
    eng = api.load("ref")
    dh = load_draft_head(out.with_suffix(".safetensors"), eng.model, eng.embed, eng.norm, eng.head,
                         eng.cfg.rms_norm_eps)
    assert dh.vocab.numel() == 64 and card["base_fingerprint"] == fingerprint(eng.model)
    assert 0.0 < card["vocab_coverage_of_greedy_tokens"] <= 1.0
    assert not (tmp_path / "dh" / "draft-head.features.safetensors").exists()


@pytest.mark.slow
def test_shipped_draft_head_matches_its_base_and_card():
    d = shipped_dir("smollm2")
    if d is None or not (d / "draft-head.safetensors").is_file():
        pytest.skip("no draft head shipped for smollm2 in this tree")
    try:
        eng = api.load("smollm2")
    except PonderError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    p = d / "draft-head.safetensors"
    dh = load_draft_head(p, eng.model, eng.embed, eng.norm, eng.head, eng.cfg.rms_norm_eps)
    assert dh.card["base_fingerprint"] == fingerprint(eng.model) and dh.vocab.numel() == dh.card["vocab"]
    assert {"code.txt", "prose.txt"} <= set(dh.card["heldout_greedy_acceptance_by_position"])


def test_chat_requests_from_training_text_cycle_every_kind():
    text, _ = training_text(200_000)
    reqs = chat_requests(text, text, 12)
    assert len(reqs) == 12 and {r["kind"] for r in reqs} <= set(KINDS)
    assert {"rename", "docstring", "explain"} <= {r["kind"] for r in reqs}
    assert len({r["messages"][0]["content"] for r in reqs}) == 12  # no request repeated
