"""Trained additions to a frozen base (models/adapters.py) and the exit translators (train/translators.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import ponder.api as api
from conftest import CALIB
from ponder.engine import SamplingConfig
from ponder.errors import PonderError
from ponder.models.adapters import Translators, fingerprint, load_translators, save_adapter, shipped_dir
from ponder.policies import registry
from ponder.train import translators as tt


def _card(eng, **kw):
    return {"kind": "translators", "base_fingerprint": fingerprint(eng.model), **kw}


def _write(path, eng, scale: float, seed: int = 0, depths=None):
    """A translators adapter for ``eng``: zero maps (scale 0, the identity) or random ones."""
    D, L = eng.cfg.hidden_size, eng.cfg.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    maps = {d: (scale * torch.randn(D, 4, generator=g), scale * torch.randn(4, D, generator=g),
                scale * torch.randn(D, generator=g)) for d in (depths or range(1, L))}
    save_adapter(path, Translators(maps).tensors(), _card(eng, rank=4))
    return path


def test_identity_translator_reproduces_the_logit_lens(eng, tmp_path):
    p = _write(tmp_path / "id.safetensors", eng, 0.0)
    tr = load_translators(p, eng.model, eng.dtype, eng.device)
    h = torch.randn(5, eng.cfg.hidden_size)
    assert all(torch.equal(tr(d, h), h) for d in range(1, eng.cfg.num_hidden_layers))
    ids = torch.tensor([CALIB[0][:24]])
    outs = []
    for lens in ("plain", str(p)):
        pol = registry.get("early-exit", 0.5, threshold=0.02, lens=lens)
        outs.append(eng.forward(ids, planner=pol.planner(eng), phase="score").logits)
    assert torch.equal(outs[0], outs[1])


def test_a_translator_changes_what_an_exit_decodes(eng, tmp_path):
    """The lens is really applied: a random map changes exited tokens' logits (and only through the lens)."""
    p = _write(tmp_path / "rand.safetensors", eng, 0.5)
    ids = torch.tensor([CALIB[1][:24]])
    outs = [eng.forward(ids, planner=registry.get("early-exit", 0.5, threshold=0.0, lens=lens).planner(eng),
                        phase="score").logits for lens in ("plain", str(p))]
    assert not torch.allclose(outs[0], outs[1])


def test_an_adapter_for_another_base_is_refused(eng, tiny_folder, tmp_path):
    other = api.load(tiny_folder("llama", layers=8, tie=True)[0])
    p = _write(tmp_path / "t.safetensors", other, 0.1)
    with pytest.raises(PonderError, match="trained for another base model"):
        load_translators(p, eng.model, eng.dtype, eng.device)
    with pytest.raises(PonderError, match="trained for another base model"):
        registry.get("early-exit", 0.5, threshold=0.5, lens=str(p)).planner(eng)
    card = json.loads(p.with_suffix(".json").read_text())
    p.with_suffix(".json").write_text(json.dumps({**card, "kind": "draft"}))
    with pytest.raises(PonderError, match="not a 'translators' one"):
        load_translators(p, other.model, other.dtype, other.device)
    p.with_suffix(".json").unlink()
    with pytest.raises(PonderError, match="has no card"):
        load_translators(p, other.model, other.dtype, other.device)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    bad.with_suffix(".json").write_text(json.dumps(_card(eng)))
    with pytest.raises(PonderError, match="unreadable"):
        load_translators(bad, eng.model, eng.dtype, eng.device)
    with pytest.raises(PonderError, match="does not exist"):
        load_translators(tmp_path / "none.safetensors", eng.model, eng.dtype, eng.device)


def test_auto_lens_without_a_shipped_adapter_is_plain(eng):
    assert shipped_dir(eng.name) is None
    pol = registry.get("early-exit", 0.5, threshold=0.3)
    ids = torch.tensor([CALIB[2][:20]])
    a = eng.forward(ids, planner=pol.planner(eng), phase="score").logits
    b = eng.forward(ids, planner=registry.get("early-exit", 0.5, threshold=0.3, lens="plain").planner(eng),
                    phase="score").logits
    assert torch.equal(a, b)


def test_speculation_through_any_lens_keeps_dense_greedy_output(eng, tmp_path):
    p = _write(tmp_path / "rand.safetensors", eng, 0.3, seed=4)
    prompts = [CALIB[3][:12], CALIB[4][:7]]
    sc = SamplingConfig(max_new_tokens=16, stop_tokens=())
    dense = registry.get("dense").generate(eng, prompts, sc).tokens
    for lens in ("plain", str(p)):
        r = registry.get("self-speculative", exit_layer=3, draft_len=3, lens=lens).generate(eng, prompts, sc)
        assert r.tokens == dense
        assert r.extra["acceptance_rate"] is not None


def test_oracle_through_the_identity_lens_equals_plain(eng, tmp_path):
    p = _write(tmp_path / "id.safetensors", eng, 0.0)
    ids = torch.tensor([CALIB[0][:16]])
    outs = [eng.forward(ids, planner=registry.get("oracle", floor=2, cap=6, lens=lens).planner(eng),
                        phase="score").logits for lens in ("plain", str(p))]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_training_lowers_the_exit_kl_and_resumes(tmp_path):
    """End to end on the shipped ``ref`` model (its tokenizer matches its vocabulary): statistics, closed form,
    distillation, card; both stages lower the KL of exits on the training text, and an interrupted statistics pass
    resumes to the same sums."""
    out = tmp_path / "tr" / "translators"
    card = tt.train_translators("ref", out, tokens=4096, rank=8, ridge=1e-3, eval_tokens=512,
                                refine_tokens=2048, lr=3e-3, progress=False)
    eng = api.load("ref")
    tr = load_translators(out.with_suffix(".safetensors"), eng.model, eng.dtype, eng.device)
    assert card["base_fingerprint"] == fingerprint(eng.model) and card["training"]["tokens"] == 4096
    assert set(card["heldout"]) == {"code.txt", "prose.txt"}
    assert not (tmp_path / "tr" / "translators.partial.safetensors").exists()
    text, _ = tt.training_text(4096 * 5)
    ids = eng.tokenizer.encode(text)[:2048]
    depths = list(range(1, eng.cfg.num_hidden_layers))
    closed = Translators(tt.solve(tt.accumulate(eng, torch.tensor(ids).view(-1, tt.SEQ), {}, None, False), 8, 1e-3))
    lens = [r["lens_kl"] for r in tt.evaluate(eng, closed, ids, depths)]
    cf = [r["translator_kl"] for r in tt.evaluate(eng, closed, ids, depths)]
    distilled = [r["translator_kl"] for r in tt.evaluate(eng, tr, ids, depths)]
    assert sum(cf) < sum(lens) and sum(distilled) < sum(cf)
    chunks = torch.tensor(eng.tokenizer.encode(text)[:4096]).view(-1, tt.SEQ)
    whole = tt.accumulate(eng, chunks, {}, None, False)
    ckpt = tmp_path / "part.safetensors"
    tt.accumulate(eng, chunks[:8], {}, ckpt, False)  # "interrupted" after the first batch
    resumed = tt.accumulate(eng, chunks, load_file(str(ckpt)), None, False)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.slow
def test_shipped_translators_match_their_base_and_card():
    """The adapter shipped for the default model loads on it (its card's base fingerprint is this model's) and its
    card carries how it was made and what it scored."""
    d = shipped_dir("smollm2")
    if d is None:
        pytest.skip("no adapters shipped for smollm2 in this tree")
    try:
        eng = api.load("smollm2")
    except PonderError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    p = d / "translators.safetensors"
    card = json.loads(p.with_suffix(".json").read_text())
    assert card["base_fingerprint"] == fingerprint(eng.model)
    tr = load_translators(p, eng.model, eng.dtype, eng.device)
    assert sorted(tr.maps) == card["depths"] and card["training"]["minutes"] > 0
    assert {"code.txt", "prose.txt"} <= set(card["heldout"])
