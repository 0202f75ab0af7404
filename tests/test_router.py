"""The learned skip router (models/adapters.Router, policies/router.py, train/router.py), on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIB, tol
from ponder.engine.plan import LayerPlan
from ponder.errors import PonderError
from ponder.models.adapters import Router, fingerprint, load_router, save_adapter
from ponder.policies.base import StaticPlanner, unit_shares
from ponder.policies.router import SkipRouter
from ponder.train.router import RouterTraining, routed_cost, train_router


def save_router(path, eng, w, b, units="attn+ffn", budget=0.5):
    save_adapter(path, Router(w, b, units).tensors(),
                 {"kind": "router", "base_fingerprint": fingerprint(eng.model), "units": units, "budget": budget})
    return path


def constant_router(tmp_path, eng, bias: torch.Tensor, units="attn+ffn"):
    L, D = eng.cfg.num_hidden_layers, eng.cfg.hidden_size
    U = bias.shape[1]
    return save_router(tmp_path / "const.safetensors", eng, torch.zeros(L, U, D), bias.float(), units)


def random_router(tmp_path, eng, seed=0, units="attn+ffn"):
    g = torch.Generator().manual_seed(seed)
    L, D = eng.cfg.num_hidden_layers, eng.cfg.hidden_size
    U = 2 if units == "attn+ffn" else 1
    return save_router(tmp_path / f"rand{seed}.safetensors", eng, torch.randn(L, U, D, generator=g) * 0.3,
                       torch.randn(L, U, generator=g) * 0.3, units)


IDS = torch.tensor([CALIB[0][:24], CALIB[1][:24]])


def test_a_router_forced_to_run_everything_is_dense(tmp_path, eng):
    p = random_router(tmp_path, eng)
    pol = SkipRouter(budget=0.5, router=str(p), threshold=50.0)
    assert torch.equal(eng.forward(IDS, planner=pol.planner(eng), phase="score").logits, eng.forward(IDS).logits)


@pytest.mark.parametrize("units", ["attn+ffn", "layer"])
def test_a_router_forced_to_skip_layer_i_is_the_layer_skip_plan(tmp_path, eng, units):
    L = eng.cfg.num_hidden_layers
    U = 2 if units == "attn+ffn" else 1
    bias = torch.full((L, U), 10.0)
    bias[3] = -10.0
    pol = SkipRouter(budget=0.5, router=str(constant_router(tmp_path, eng, bias, units)), threshold=0.0)
    plans = [LayerPlan.skip(eng.device, kv="compute") if i == 3 else None for i in range(L)]
    want = eng.forward(IDS, planner=StaticPlanner(plans), phase="score").logits
    assert torch.equal(eng.forward(IDS, planner=pol.planner(eng), phase="score").logits, want)
    # and only the FFN: the attention still runs
    if units == "attn+ffn":
        bias[3] = torch.tensor([10.0, -10.0])
        pol = SkipRouter(budget=0.5, router=str(constant_router(tmp_path, eng, bias)), threshold=0.0)
        plans[3] = LayerPlan(attn=None, ffn=torch.empty(0, dtype=torch.long), kv="compute")
        want = eng.forward(IDS, planner=StaticPlanner(plans), phase="score").logits
        assert torch.equal(eng.forward(IDS, planner=pol.planner(eng), phase="score").logits, want)


def test_the_fitted_offset_meets_the_budget_and_skips_are_counted(tmp_path, eng):
    pol = SkipRouter(budget=0.6, router=str(random_router(tmp_path, eng)))
    pol.calibrate(eng, CALIB)
    assert pol.calibration["calibration_fraction"] <= 0.6
    st = eng.new_stats()
    eng.forward(torch.tensor(CALIB[:2]), planner=pol.planner(eng), stats=st, phase="score")
    assert st.flops_fraction < 0.75 and st.overhead_flops > 0
    assert pol.describe()["router_used"]["units"] == "attn+ffn" and pol.describe()["training_free"] is False


def test_a_saved_router_reloads_to_the_same_decisions(tmp_path, eng):
    p = random_router(tmp_path, eng, seed=3)
    r = load_router(p, eng.model, eng.device)
    g = torch.Generator().manual_seed(3)
    L, D = eng.cfg.num_hidden_layers, eng.cfg.hidden_size
    assert torch.equal(r.w, torch.randn(L, 2, D, generator=g) * 0.3)
    a = SkipRouter(budget=0.6, router=str(p))
    a.calibrate(eng, CALIB)
    b = SkipRouter(budget=0.6, router=str(p), threshold=a.calibration["threshold"])
    la = eng.forward(IDS, planner=a.planner(eng), phase="score").logits
    assert torch.equal(la, eng.forward(IDS, planner=b.planner(eng), phase="score").logits)


def test_a_router_for_another_base_is_refused(tmp_path, eng, tiny_folder):
    import ponder.api as api

    other = api.load(tiny_folder("llama", layers=4)[0])
    p = random_router(tmp_path, other)
    with pytest.raises(PonderError, match="another base model"):
        SkipRouter(budget=0.75, router=str(p)).calibrate(eng, CALIB)
    with pytest.raises(PonderError, match="no router is shipped"):
        SkipRouter(budget=0.75).calibrate(eng, CALIB)


def test_one_token_steps_decide_as_the_batch_does(tmp_path, eng):
    """The router's logits are per-row reductions: a prefill of T tokens and T one-token steps take the same units."""
    pol = SkipRouter(budget=0.6, router=str(random_router(tmp_path, eng, seed=5)))
    pol.calibrate(eng, CALIB)
    ids = IDS[:1]
    st_all = eng.new_stats()
    eng.forward(ids, planner=pol.planner(eng), stats=st_all, phase="score")
    cache = eng.new_cache(1, ids.shape[1])
    st_one = eng.new_stats()
    pl = pol.planner(eng)
    for t in range(ids.shape[1]):
        eng.forward(ids[:, t:t + 1], cache, pl, st_one, logits="last", phase="decode")
    assert st_one.flops == pytest.approx(st_all.flops)


def test_routed_cost_counts_kv_for_every_token(eng):
    qo, kv, ffn = unit_shares(eng)
    assert qo + kv + ffn == pytest.approx(1.0)
    L = eng.cfg.num_hidden_layers
    ones, zeros = torch.ones(L, 1, 3), torch.zeros(L, 1, 3)
    assert torch.allclose(routed_cost(ones, ones, (qo, kv, ffn)), torch.ones(1, 3))
    assert torch.allclose(routed_cost(zeros, zeros, (qo, kv, ffn)), torch.full((1, 3), kv))


@pytest.mark.parametrize("estimator", ["ste", "gumbel", "reinforce", "soft"])
def test_training_moves_the_realized_budget_to_the_target(eng, estimator):
    seqs = [torch.tensor(c[:32]) for c in CALIB] * 2
    cfg = RouterTraining(0.6, estimator=estimator, steps=150, lr=0.1)
    train_router(eng, seqs, cfg, batch=4, progress=False)
    first, last = cfg.log[0]["fraction"], sum(r["fraction"] for r in cfg.log[-10:]) / 10
    # the budget is an upper bound (the multiplier never pays for more compute): from dense to at most the target
    assert first > 0.85 and last <= 0.65


def test_a_trained_router_beats_a_random_one_at_the_same_budget(tmp_path, eng):
    """What training buys: at the same fitted budget, the trained router's outputs are closer to dense (KL) than
    those of a random router's."""
    seqs = [torch.tensor(c[:32]) for c in CALIB] * 2
    r = train_router(eng, seqs, RouterTraining(0.7, steps=80, lr=0.1, dual_lr=0.5, rho=10.0), batch=4,
                     progress=False)
    trained = save_router(tmp_path / "trained.safetensors", eng, r.w, r.b)

    def kl(path):
        pol = SkipRouter(budget=0.7, router=str(path))
        pol.calibrate(eng, CALIB)
        ids = torch.tensor(CALIB)
        tp = torch.log_softmax(eng.forward(ids).logits, -1)
        lp = torch.log_softmax(eng.forward(ids, planner=pol.planner(eng), phase="score").logits, -1)
        return float((tp.exp() * (tp - lp)).sum(-1).mean())

    assert kl(trained) < 0.8 * min(kl(random_router(tmp_path, eng, seed=s)) for s in (1, 2))


def test_training_resumes_from_its_checkpoint(tmp_path, eng):
    seqs = [torch.tensor(c[:32]) for c in CALIB] * 2
    ck = tmp_path / "r.partial.safetensors"
    full = train_router(eng, seqs, RouterTraining(0.6, steps=20), batch=4, progress=False)
    train_router(eng, seqs, RouterTraining(0.6, steps=10), batch=4, ckpt=ck, progress=False)
    resumed = train_router(eng, seqs, RouterTraining(0.6, steps=20), batch=4, ckpt=ck, progress=False)
    assert torch.allclose(full.w, resumed.w, atol=1e-5) and torch.allclose(full.b, resumed.b, atol=1e-5)


def test_bad_training_settings_are_refused():
    with pytest.raises(PonderError, match="budget"):
        RouterTraining(1.0)
    with pytest.raises(PonderError, match="estimator"):
        RouterTraining(0.5, estimator="magic")
    with pytest.raises(PonderError, match="units"):
        RouterTraining(0.5, units="heads")


def test_on_quantised_weights_run_everything_is_dense_and_a_skip_is_a_skip(tmp_path, qeng):
    p = random_router(tmp_path, qeng)
    dense = qeng.forward(IDS).logits
    pol = SkipRouter(budget=0.6, router=str(p), threshold=50.0)
    assert (qeng.forward(IDS, planner=pol.planner(qeng), phase="score").logits - dense).abs().max() < tol(qeng)
    pol = SkipRouter(budget=0.6, router=str(p))
    pol.calibrate(qeng, CALIB)
    assert (qeng.forward(IDS, planner=pol.planner(qeng), phase="score").logits - dense).abs().max() > tol(qeng)


def test_the_static_start_skips_the_cheapest_units_until_the_budget_is_met():
    from ponder.train.router import static_start

    imp = torch.tensor([[0.5, 3.0], [0.1, 0.2], [2.0, 9.0]])
    shares = (0.2, 0.05, 0.75)
    b, f = static_start(imp, 0.8, shares, "attn+ffn")
    # per FLOP saved: (1, ffn) 0.27, (1, attn) 0.5, (0, attn) 2.5, ...: the FFN of layer 1 goes first (-0.25)
    assert f == pytest.approx(1 - 0.75 / 3) and (b < 0).tolist() == [[False, False], [False, True], [False, False]]
    b, f = static_start(imp, 0.7, shares, "attn+ffn")
    assert (b < 0).sum() == 2 and bool(b[1, 0] < 0) and f <= 0.7


def test_a_static_start_begins_at_the_budget(eng):
    seqs = [torch.tensor(c[:32]) for c in CALIB] * 2
    cfg = RouterTraining(0.7, steps=1, start="static")
    train_router(eng, seqs, cfg, batch=4, progress=False)
    assert cfg.start_info["static_fraction"] <= 0.7 and cfg.log[0]["fraction"] <= 0.75


def first_policy(path, **kw):
    from ponder.policies.first import First

    return First(budget=0.6, router=str(path), **kw)


def test_first_decides_once_per_sequence_and_leaves_no_kv_for_its_skipped_layers(tmp_path, eng):
    L = eng.cfg.num_hidden_layers
    bias = torch.full((L, 2), 10.0)
    bias[2] = -10.0
    pol = first_policy(constant_router(tmp_path, eng, bias), threshold=0.0)
    plans = [LayerPlan.skip(eng.device, kv="none") if i == 2 else None for i in range(L)]
    want = eng.forward(IDS, planner=StaticPlanner(plans), phase="score").logits
    assert torch.equal(eng.forward(IDS, planner=pol.planner(eng), phase="score").logits, want)
    pl = pol.planner(eng)
    cache = eng.new_cache(1, 30)
    eng.forward(IDS[:1, :20], cache, pl, logits="last", phase="prefill")
    decided = list(pl.keep)
    eng.forward(IDS[:1, 20:21], cache, pl, logits="last", phase="decode")
    assert pl.keep == decided and not cache.layer_valid(2)[0, :21].any() and cache.layer_valid(3)[0, :21].all()


def test_first_keeps_the_layers_the_prompt_scores_highest_and_meets_the_budget(tmp_path, eng):
    pol = first_policy(random_router(tmp_path, eng, seed=2))
    pol.calibrate(eng, CALIB)
    assert pol.calibration["calibration_fraction"] <= 0.6
    dense = first_policy(random_router(tmp_path, eng, seed=2), threshold=50.0)
    assert torch.equal(eng.forward(IDS, planner=dense.planner(eng), phase="score").logits, eng.forward(IDS).logits)


def test_training_on_quantised_weights_is_refused(qeng):
    with pytest.raises(PonderError, match="float"):
        train_router(qeng, [torch.tensor(c[:32]) for c in CALIB], RouterTraining(0.6, steps=1), batch=2)


REF = Path(__file__).resolve().parents[1] / "models" / "ref" / "model.safetensors"


@pytest.mark.skipif(not REF.is_file(), reason="models/ref not present")
def test_train_router_command_writes_an_adapter_the_cli_runs(tmp_path, capsys):
    """End to end on `ref`: the command trains, evaluates held out, writes adapter + card; eval loads it."""
    import json

    from ponder.cli import main

    out = tmp_path / "router-0.8"
    assert main(["train", "router", "--model", "ref", "--budget", "0.8", "--steps", "3", "--tokens", "4096",
                 "--chat", "0", "--eval-tokens", "256", "--out", str(out)]) == 0
    card = json.loads((tmp_path / "router-0.8.json").read_text())
    assert card["kind"] == "router" and card["budget"] == 0.8 and card["training"]["steps"] == 3
    assert {"code.txt", "prose.txt"} <= set(card["heldout"]) and not (tmp_path / "router-0.8.partial.safetensors"
                                                                        ).exists()
    data = tmp_path / "t.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 20)
    capsys.readouterr()
    assert main(["eval", "--model", "ref", "--data", str(data), "--policy", "router", "--budget", "0.8",
                 "--router", str(tmp_path / "router-0.8.safetensors"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # (the offset is fitted on the calibration text; this repetitive text realizes its own fraction)
    assert res["flops_fraction"] < 0.99 and res["policy"]["router_used"]["budget"] == 0.8
    rc = main(["eval", "--model", "ref", "--data", str(data), "--policy", "router", "--budget", "0.8",
               "--router", str(tmp_path / "nope.safetensors")])
    assert rc != 0 and "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not REF.is_file(), reason="models/ref not present")
def test_the_default_bench_points_leave_out_every_router_row_where_no_router_ships():
    """`ref` ships no router: neither `router` nor `first` (which reads the router's scores) may stay in its
    default points, or `ponder bench --model ref` fails on them."""
    import ponder
    from ponder.eval.points import default_policies, drop_unshipped, plan_points

    pts = drop_unshipped(plan_points(default_policies(), [0.9, 0.75]), ponder.load("ref"))
    assert not {"router", "first"} & {p.policy.split(":")[0] for p in pts}
    assert "layer-drop" in {p.policy for p in pts}
