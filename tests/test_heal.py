"""Healed layer drop (train/heal.py, LayerPlan.replace, layer-drop:heal=...), on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import CALIB
from ponder.engine.plan import LayerPlan
from ponder.errors import PonderError
from ponder.models.adapters import LayerReplacement
from ponder.policies import registry


def _zero(D: int, r: int = 4) -> LayerReplacement:
    return LayerReplacement(torch.zeros(D, r), torch.zeros(r, D), torch.zeros(D))


def test_a_zero_replacement_is_the_plain_drop_and_is_counted(eng):
    plain = registry.get("layer-drop", 0.75)
    plain.calibrate(eng, CALIB)
    healed = registry.get("layer-drop", 0.75)
    healed.calibrate(eng, CALIB)
    D = eng.cfg.hidden_size
    healed.replacements = {i: _zero(D) for i in healed.dropped}
    ids = torch.tensor([CALIB[0][:20]])
    st_p, st_h = eng.new_stats(), eng.new_stats()
    a = eng.forward(ids, planner=plain.planner(eng), stats=st_p, phase="score").logits
    b = eng.forward(ids, planner=healed.planner(eng), stats=st_h, phase="score").logits
    assert torch.equal(a, b)
    per_row = _zero(D).flops_per_row()
    assert st_h.overhead_flops - st_p.overhead_flops == pytest.approx(len(healed.dropped) * 20 * per_row)
    # a non-zero stand-in changes the result
    healed.replacements = {i: LayerReplacement(torch.randn(D, 4) * 0.1, torch.randn(4, D) * 0.1, torch.zeros(D))
                           for i in healed.dropped}
    assert not torch.equal(a, eng.forward(ids, planner=healed.planner(eng), phase="score").logits)


def test_a_replacement_only_stands_in_for_a_whole_skipped_layer():
    with pytest.raises(ValueError, match="whole skipped layer"):
        LayerPlan(attn=None, ffn=torch.empty(0, dtype=torch.long), replace=_zero(8))


def test_train_heal_fits_the_dropped_layers_and_the_policy_loads_it(tmp_path):
    """On `ref` (12 layers; trained, with a tokenizer for the training text)."""
    from ponder.api import load
    from ponder.policies.layer_drop import LayerDrop
    from ponder.train import heal

    folder = "ref"
    out = tmp_path / "layer-heal-0.75"
    card = heal.train_heal(folder, out, 0.75, rank=8, ridge=1e-3, tokens=4096, eval_tokens=512, progress=False)
    assert card["kind"] == "layer-heal" and len(card["dropped"]) == 3 and card["budget"] == 0.75
    assert {"ppl_dense", "ppl_plain_drop", "ppl_healed_drop"} <= set(card["heldout"]["code.txt"])
    assert set(card["heldout"]) == {"code.txt", "prose.txt"}
    eng = load(folder)
    calib = [list(range(3, 60))] * 2
    pol = LayerDrop(budget=0.75, heal=str(tmp_path / "layer-heal-0.75.safetensors"))
    pol.calibrate(eng, calib)
    assert pol.dropped == card["dropped"] and sorted(pol.replacements) == card["dropped"]
    d = pol.describe()
    assert d["training_free"] is False and d["heal_used"]["dropped"] == card["dropped"]
    # on its training text (what least squares guarantees), the first dropped layer's stand-in brings the state
    # closer to dense than skipping the layer does
    from ponder.engine.states import layer_states
    from ponder.train.translators import SEQ, training_ids

    i = card["dropped"][0]
    ids = torch.tensor(training_ids(eng, folder, 4096, SEQ, "a test")[2][:4096]).view(-1, SEQ)
    dense = layer_states(eng, ids, last=i + 1)[i]
    h = layer_states(eng, ids, last=i)[i - 1] if i else eng.embedding(ids)
    assert ((h + pol.replacements[i](h) - dense) ** 2).mean() < ((h - dense) ** 2).mean()
    # quantising the weights here makes another base (other values): the adapter is refused, not misapplied
    qpol = LayerDrop(budget=0.75, heal=str(tmp_path / "layer-heal-0.75.safetensors"))
    qeng = load(folder, quantize="q8_0")
    with pytest.raises(PonderError, match="another base model"):  # q8_0 of these weights is another base
        qpol.calibrate(qeng, calib)
    with pytest.raises(PonderError, match="trained for budget 0.75, not 0.5"):
        LayerDrop(budget=0.5, heal=str(tmp_path / "layer-heal-0.75.safetensors")).calibrate(eng, calib)


def test_shipped_heal_adapters_match_their_base_and_card():
    """The heal adapters shipped for the default model load on it, in its default (native) weight form, and their
    cards say how they were made and what they scored."""
    import json

    from ponder import api
    from ponder.models.adapters import load_replacements, shipped_dir

    d = shipped_dir("smollm2")
    files = sorted(d.glob("layer-heal-*.safetensors")) if d is not None else []
    if not files:
        pytest.skip("no heal adapters shipped for smollm2 in this tree")
    try:
        eng = api.load("smollm2")
    except PonderError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    for p in files:
        card = json.loads(p.with_suffix(".json").read_text())
        reps, _ = load_replacements(p, eng.model, eng.dtype, eng.device)
        assert sorted(reps) == card["dropped"] and p.stem == f"layer-heal-{card['budget']:g}"
        assert card["training"]["minutes"] > 0 and {"code.txt", "prose.txt"} <= set(card["heldout"])
        pol = registry.get("layer-drop:heal=auto", card["budget"])
        pol.calibrate(eng, [])
        assert pol.dropped == card["dropped"] and pol.describe()["training_free"] is False


def test_distillation_steps_lower_the_kl():
    """From the unhealed start (zero maps) on `ref`, two steps of end-to-end distillation on one batch lower
    KL(dense || healed) on that batch."""
    from ponder.api import load
    from ponder.train import heal
    from ponder.train.translators import SEQ, training_ids

    eng = load("ref")
    D = eng.cfg.hidden_size
    seqs = list(torch.tensor(training_ids(eng, "ref", 8 * SEQ, SEQ, "a test")[2][:8 * SEQ]).view(-1, SEQ))
    dropped = [2, 5]

    def kl(reps):
        ids = torch.stack(seqs)
        with torch.no_grad():
            tp = torch.log_softmax(eng.model(ids).float(), -1)
            lp = torch.log_softmax(eng.model(ids, replace=reps).float(), -1)
        return float((tp.exp() * (tp - lp)).sum(-1).mean())

    reps = {i: _zero(D, 8) for i in dropped}
    reps[2].u.normal_(0, 0.01)  # a zero u and v would have zero gradients for both
    before = kl(reps)
    for _ in range(2):
        reps = heal.refine(eng, seqs, reps, 8 * SEQ, 1e-3, progress=False)
    assert kl(reps) < before
