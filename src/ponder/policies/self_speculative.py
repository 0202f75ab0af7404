"""Self-speculative decoding as a policy: lossless at every budget; it changes speed, never the output.

The decoding loop is ``engine/speculative.py``. This file chooses its two knobs:

- Draft depth ``E``. ``budget < 1`` fixes it: ``E = round(budget * L)`` (clamped to ``[1, L - 1]``), so a budget
  sweep is a sweep over draft depths. ``budget = 1`` (the default) lets calibration choose: the logit lens on
  calibration text gives, per depth, the share of tokens whose top-1 there equals the final top-1 (the greedy
  acceptance rate ``alpha(E)``), and ``E`` maximises the expected speedup of a simple cost model. If even the best
  ``E`` is expected to be slower than plain decoding (a model not trained for early exit, like the shipped one),
  auto mode does not draft with layers at all: plain decoding, or lookup drafts only (``extra`` says which and
  why). An explicit ``exit_layer`` overrides all of this.
- Draft length ``k``: starts at the model's best for ``alpha(E)`` and adapts online (longer after a fully accepted
  round, shorter after a rejection).

Cost model, in units of one layer's batch-1 decode step: a draft step costs ``E + call`` plus a head call, the
verification of ``k + 1`` tokens ``(L - E + head) * (1 + slope * k) + call``, a dense step ``L + head + call``
(constants below, measured). With iid acceptance ``alpha`` a round yields ``(1 - alpha^(k+1)) / (1 - alpha)``
tokens.

Drafter. ``"layers"`` (default) is the method above. ``"lookup"`` drafts instead from the context (prompt lookup:
the tokens that followed the last occurrence of the current 3- or 2-token suffix), which costs no model work and is
verified by one full pass; ``"lookup+layers"`` uses the context when it has a match and the first layers otherwise.
``"head"`` drafts with a trained module on the model's final features (``models.adapters.DraftHead``, trained by
``ponder train draft-head``; ``head="auto"`` finds the one shipped for the model), ``"lookup+head"`` with the context
first. Every drafter goes through the same verification, so every one is lossless.

Scoring (perplexity) is the dense model: speculation only exists in generation. Batches work (every row keeps the
batch's smallest accepted count); the target is batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.forward import Engine, Planner
from ..engine.generate import GenerationResult, SamplingConfig, generate
from ..engine.speculative import DRAFTERS, SpecConfig, speculative_generate
from ..engine.states import layer_states
from ..engine.stats import Stats
from ..errors import PonderError
from .base import Calibrated, draft_head, exit_lens, lens_name
from .budget import shipped_calibration
from .registry import register

# Cost model, in units of one layer's batch-1 decode step, measured on the reference CPU (2-core Xeon, float32,
# the shipped 12-layer d=256 model): a layer 0.38 ms, the LM head 0.26 ms (0.7 layer: it has 2.7 layers' parameters
# but is one large matmul), per-forward overhead ~0.1 ms, and each extra token in a verification pass adds ~15% of
# the layers' cost. Only the choice of E and k depends on it; the output never does.
HEAD_COST = 0.7
CALL_COST = 0.25
VERIFY_SLOPE = 0.15
CALIB_TOKENS = 2048


def expected_speedup(L: int, E: int, k: int, alpha: float, head: float = HEAD_COST, call: float = CALL_COST,
                     slope: float = VERIFY_SLOPE) -> float:
    """Dense time per token over speculative time per token, for iid greedy acceptance ``alpha``."""
    alpha = min(max(alpha, 0.0), 0.999)
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    draft = (k + 1) * (E + call) + k * head
    verify = (L - E) * (1 + slope * k) + head * (1 + slope * k) + call
    return tokens * (L + head + call) / (draft + verify)


def best_plan(L: int, alphas: dict[int, float], max_draft: int) -> tuple[int, int, float]:
    """(E, k, expected speedup) maximising the cost model over the given depths and k in [1, max_draft]."""
    return max(((E, k, expected_speedup(L, E, k, a)) for E, a in alphas.items()
                for k in range(1, max_draft + 1)), key=lambda t: t[2])


@register
@dataclass
class SelfSpeculative(Calibrated):
    """Draft with the first layers + shared head, verify in one pass of the rest; greedy output = dense."""

    name: ClassVar[str] = "self-speculative"
    lossless: ClassVar[bool] = True
    exit_layer: int | None = None  # None: from the budget (< 1) or calibration (budget 1)
    draft_len: int | None = None  # initial drafts per round; None: the cost model's best
    max_draft: int = 12
    adaptive: bool = True
    drafter: str = "layers"  # "layers" (LayerSkip) | "lookup" (context n-grams) | "lookup+layers"
    lens: str = "auto"  # what a layer draft decodes through: "auto" (shipped exit translators), "plain", or a path
    head: str = "auto"  # drafter "head": "auto" (the draft head shipped for the model) or an adapter's path

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drafter not in DRAFTERS:
            raise PonderError(f"drafter must be one of {', '.join(DRAFTERS)}, not {self.drafter!r}")
        if self.drafter in ("lookup", "head", "lookup+head") and self.budget < 1.0:
            # the budget picks the draft depth; lookup drafts use no layers, so every budget would run the same
            # computation, and a sweep would report one measurement several times as if they were different points
            raise PonderError(f"self-speculative with drafter={self.drafter} does not draft with layers: it has no "
                              "budget to set; use budget 1 (or drafter=lookup+layers)")

    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        """Greedy acceptance rate per draft depth: the logit lens (top-1 at depth E equals the final top-1) on
        calibration text (up to ``CALIB_TOKENS`` tokens: a rate needs far fewer than a threshold fit)."""
        seqs = [s for s in texts if len(s) >= 2]
        if not seqs:
            self.fitted(engine, {"alphas": {}})
            return
        n = min(len(s) for s in seqs)
        seqs = [s[:n] for s in seqs][:max(1, CALIB_TOKENS // n)]
        L = engine.cfg.num_hidden_layers
        lens = exit_lens(engine, self.lens)
        agree = torch.zeros(L)
        with torch.inference_mode():
            for i in range(0, len(seqs), 4):
                outs = layer_states(engine, torch.tensor(seqs[i:i + 4], device=engine.device))
                final = engine.logits(outs[-1]).argmax(-1)
                for layer, h in enumerate(outs[:-1]):
                    hh = h if lens is None else lens(layer + 1, h)
                    agree[layer] += (engine.logits(hh).argmax(-1) == final).sum().cpu()
        total = len(seqs) * n
        self.fitted(engine, {"alphas": {i + 1: float(agree[i]) / total for i in range(L - 1)},
                             "lens_used": lens_name(lens)})

    def _exit_layer(self, engine: Engine) -> int:
        L = engine.cfg.num_hidden_layers
        if L < 2:
            raise PonderError("self-speculative decoding needs a model with at least two layers")
        if self.exit_layer is not None:
            if not 1 <= self.exit_layer < L:
                raise PonderError(f"exit_layer must be in [1, {L - 1}] for this {L}-layer model")
            return self.exit_layer
        if self.budget < 1.0:
            return min(max(round(self.budget * L), 1), L - 1)
        alphas = self._alphas(engine)
        return best_plan(L, alphas, self.max_draft)[0] if alphas else max(1, L // 2)

    def _alphas(self, engine: Engine) -> dict[int, float]:
        if not self.fitted_for(engine):
            self.calibrate(engine, shipped_calibration(engine))
        return self.calibration["alphas"]

    def spec_config(self, engine: Engine) -> SpecConfig:
        E = self._exit_layer(engine)
        k = self.draft_len
        if k is None:
            alphas = self._alphas(engine)
            k = best_plan(engine.cfg.num_hidden_layers, {E: alphas[E]}, self.max_draft)[1] if E in alphas else 4
        lens = exit_lens(engine, self.lens)
        return SpecConfig(exit_layer=E, draft_len=max(1, min(k, self.max_draft)), max_draft=self.max_draft,
                          adaptive=self.adaptive, drafter=self.drafter,
                          draft_lens=(lambda h: lens(E, h)) if lens is not None and lens.has(E) else None)

    def planner(self, engine: Engine) -> Planner | None:
        return None  # scoring is dense: speculation changes how tokens are generated, not what they cost to score

    def layer_drafting_pays(self, engine: Engine) -> tuple[bool, float | None]:
        """In auto mode (budget 1, no explicit exit layer), whether the cost model expects layer drafts to beat
        plain decoding on this model; explicit choices are always honoured."""
        if self.exit_layer is not None or self.budget < 1.0:
            return True, None
        alphas = self._alphas(engine)
        if not alphas:
            return True, None
        _, _, gain = best_plan(engine.cfg.num_hidden_layers, alphas, self.max_draft)
        return gain > 1.0, gain

    def generate(self, engine: Engine, prompts: list[list[int]], sc: SamplingConfig, stats: Stats | None = None,
                 on_token=None) -> GenerationResult:
        if self.max_draft < 1:
            raise PonderError("max_draft must be >= 1")
        if "head" in self.drafter:
            cfg = SpecConfig(exit_layer=max(1, engine.cfg.num_hidden_layers // 2),
                             draft_len=max(1, min(self.draft_len or 2, self.max_draft)), max_draft=self.max_draft,
                             adaptive=self.adaptive, drafter=self.drafter, draft_head=draft_head(engine, self.head))
            return speculative_generate(engine, prompts, sc, cfg, stats, on_token)
        pays, gain = self.layer_drafting_pays(engine) if engine.cfg.num_hidden_layers >= 2 else (False, None)
        note = {"predicted_layer_draft_speedup": round(gain, 3) if gain is not None else None,
                "layer_drafting": pays}
        if engine.cfg.num_hidden_layers < 2 or (not pays and self.drafter == "layers"):
            res = generate(engine, prompts, sc, None, stats, on_token)  # speculation would only slow it down
            res.extra.update(note)
            return res
        cfg = self.spec_config(engine)
        if not pays:
            cfg.drafter = "lookup"
        res = speculative_generate(engine, prompts, sc, cfg, stats, on_token)
        res.extra.update(note)
        return res
