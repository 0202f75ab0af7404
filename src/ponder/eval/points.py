"""What a bench run measures: its settings (two profiles), the evaluation files, and the (policy, budget) points.

Apart from ``bench.py`` because planning a run needs no model and no timing: the CLI checks every requested point
before anything is loaded, and tests read the profiles without running them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.forward import Engine
from ..models.adapters import shipped_adapter
from ..policies import registry
from ..policies.base import exit_lens, has_draft_head
from ..policies.router import shipped_routers
from .peers import LLAMACPP_F32, LLAMACPP_FILE, PEER

CONTROL = "dense-control"
RESERVED = (CONTROL, PEER, LLAMACPP_F32, LLAMACPP_FILE)
# Budget 1 of every policy is the dense plan (tests hold each to dense exactly); the sweep spends its time below it.
DEFAULT_BUDGETS = (0.9, 0.75, 0.6, 0.5)
QUICK_BUDGETS = (0.9, 0.75)
# Variants measured by default beside the registered policies, each at the budgets that mean something for it
# (fixed, or () for the sweep's budgets): prompt-lookup and head drafting have no layer budget; the "lens=plain"
# twins are the training-free rows of the policies that use a model's trained exit translators. Rows that need an
# artefact the model does not ship are dropped (``drop_unshipped``): they would repeat another row's computation.
DEFAULT_VARIANTS: dict[str, tuple[float, ...]] = {"self-speculative:drafter=lookup": (1.0,),
                                                  "self-speculative:drafter=head": (1.0,),
                                                  "early-exit:lens=plain": (), "oracle:lens=plain": (),
                                                  "self-speculative:lens=plain": (1.0,),
                                                  "layer-drop:heal=auto": ()}
PLAIN_TWIN = ":lens=plain"
HEAD_DRAFTER = ":drafter=head"
HEALED = ":heal=auto"


def repo_data(name: str) -> Path:
    here = Path(__file__).resolve()
    for p in (here.parents[3] / "data" / "eval" / name, here.parents[1] / "_data" / "eval" / name):
        if p.is_file():
            return p
    return here.parents[3] / "data" / "eval" / name  # reported as missing by the caller


@dataclass
class BenchSettings:
    """Everything that changes what a point measures; its hash keys the points of a results file."""

    data: str = ""  # main evaluation text (default: data/eval/code.txt)
    prose: str | None = None  # second text for perplexity (default in the full profile: data/eval/prose.txt)
    probes_file: str | None = None
    # Sized for the default model (SmolLM2-135M, 30 layers) on 2 cores: every policy at four budgets in < 30 min.
    ppl_tokens: int = 4096
    prose_tokens: int = 2048
    kl_tokens: int = 2048
    prompts: int = 6
    prompt_tokens: int = 64
    new_tokens: int = 24  # per greedy prompt
    timing_tokens: int = 24  # generated per timed decode (batch 1 and batch ``decode_batch``)
    calib_tokens: int = 2048  # calibration text for policies that fit thresholds (never the evaluation data)
    probes: int = 16
    prefill_tokens: int = 128
    decode_batch: int = 8
    warmup: int = 1
    repeats: int = 3
    # per measurement and side: add rounds until each side ran this long (this host is noisy in bursts: a median of
    # too few rounds moved by 10% between runs on the 12-layer model, 2026-11-26)
    min_timed_s: float = 1.0
    peer: bool = True
    # Input-grounded chat prompts (data/eval/instruct.jsonl, rendered with the model's chat template), where lossless
    # policies are also timed at batch 1, one prompt after another, apart from open continuation.
    instruct_file: str | None = None
    instruct_prompts: int = 6
    instruct_tokens: int = 128
    profile: str = "full"

    @classmethod
    def full(cls) -> BenchSettings:
        return cls(data=str(repo_data("code.txt")), prose=str(repo_data("prose.txt")),
                   probes_file=str(repo_data("probes.jsonl")), instruct_file=str(repo_data("instruct.jsonl")))

    @classmethod
    def quick(cls) -> BenchSettings:
        # Sized for a 30-layer 135M model on 2 cores (about 20 s a point): every policy at two budgets in < 8 min.
        return cls(data=str(repo_data("code.txt")), prose=None, probes_file=str(repo_data("probes.jsonl")),
                   ppl_tokens=1024, prose_tokens=0, kl_tokens=512, prompts=3, prompt_tokens=40, new_tokens=16,
                   timing_tokens=12, calib_tokens=1024, probes=6, prefill_tokens=128, decode_batch=4, warmup=1,
                   repeats=3, min_timed_s=0.25, instruct_prompts=0, profile="quick")

    def key_fields(self, engine: Engine) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "prose", "probes_file", "instruct_file"):  # a file's identity: its name and size
            p = d.get(k)
            d[k] = None if not p else f"{Path(p).name}:{Path(p).stat().st_size if Path(p).is_file() else 0}"
        d.update(dtype=str(engine.dtype), device=str(engine.device), threads=torch.get_num_threads(),
                 weights=engine.weights_form)
        return d


@dataclass
class Point:
    policy: str
    budget: float


def plan_points(policies: list[str], budgets: list[float]) -> list[Point]:
    pts: list[Point] = []
    for name in policies:
        if name in ("dense",) + RESERVED:
            continue
        fixed = DEFAULT_VARIANTS.get(name)
        registry.get(name, fixed[0] if fixed else budgets[0])  # unknown names fail here, before anything loads
        for b in (fixed or budgets):
            pts.append(Point(name, b))
    return pts


def default_policies() -> list[str]:
    """What ``ponder bench`` measures when no --policies is given: every registered policy and the variants."""
    return registry.names() + list(DEFAULT_VARIANTS)


def drop_unshipped(points: list[Point], engine: Engine) -> list[Point]:
    """The default points without the rows that need an artefact this model does not ship (trained translators for
    the plain-lens twins, a draft head for the head drafter, a heal adapter for a healed drop at that budget, a
    router for the learned router's rows)."""
    if exit_lens(engine, "auto") is None:
        points = [p for p in points if not p.policy.endswith(PLAIN_TWIN)]
    if not has_draft_head(engine):
        points = [p for p in points if not p.policy.endswith(HEAD_DRAFTER)]
    name = getattr(engine, "name", "")
    if not shipped_routers(name):  # every policy that would look for a shipped router (router, first)
        points = [p for p in points if getattr(registry.get(p.policy, p.budget), "router", None) != "auto"]
    return [p for p in points if not p.policy.endswith(HEALED)
            or shipped_adapter(name, f"layer-heal-{p.budget:g}") is not None]


def profile_settings(quick: bool, **overrides: Any) -> BenchSettings:
    s = BenchSettings.quick() if quick else BenchSettings.full()
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})
