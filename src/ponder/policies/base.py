"""The policy interface: one budget knob, four honest flags, and plans for the engine.

A policy decides; it never touches weights or the cache. Static policies return the same per-layer plan every step;
adaptive ones read the hidden states the engine passes to ``Planner.layer`` and answer for the rows in front of them.
A policy that changes *how* tokens are generated (speculative decoding) overrides ``generate``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ..engine.forward import Engine, Planner, PlannerBase, StepContext
from ..engine.generate import GenerationResult, SamplingConfig, generate
from ..engine.plan import LayerPlan
from ..engine.stats import Stats
from ..errors import PonderError
from ..models.adapters import DraftHead, Translators, load_draft_head, load_translators, shipped_adapter


@dataclass
class Policy:
    """Base class. ``budget`` is the target fraction of dense per-token layer FLOPs, in (0, 1]."""

    budget: float = 1.0

    name: ClassVar[str] = "base"
    real: ClassVar[bool] = True  # skipped work is really not computed (gather/scatter), so timing it is meaningful
    kv_compatible: ClassVar[bool] = True  # KV-cached decoding equals recomputing the whole sequence
    batch_compatible: ClassVar[bool] = True  # a batch equals its rows run alone
    training_free: ClassVar[bool] = True
    lossless: ClassVar[bool] = False  # greedy output identical to dense at every budget

    def __post_init__(self) -> None:
        b = self.budget
        if not isinstance(b, (int, float)) or not 0 < float(b) <= 1:
            raise PonderError(f"budget must be in (0, 1], got {b!r}")
        self.budget = float(b)

    # ---- to override -----------------------------------------------------------------------------------------
    def calibrate(self, engine: Engine, texts: list[list[int]]) -> None:
        """Fit thresholds / choose layers on calibration token sequences. Default: nothing to fit."""

    def planner(self, engine: Engine) -> Planner | None:
        """A fresh planner for one generate/score call (it may keep per-call state). None: dense."""
        return None

    def generate(self, engine: Engine, prompts: list[list[int]], sc: SamplingConfig, stats: Stats | None = None,
                 on_token=None) -> GenerationResult:
        return generate(engine, prompts, sc, lambda: self.planner(engine), stats, on_token)

    # ---- shared ----------------------------------------------------------------------------------------------
    @classmethod
    def flags(cls) -> dict[str, bool]:
        return {"real": cls.real, "kv_compatible": cls.kv_compatible, "batch_compatible": cls.batch_compatible,
                "training_free": cls.training_free, "lossless": cls.lossless}

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **self.params(), **self.flags()}


T = TypeVar("T")
# engine -> {key: result}: what calibration computed for that engine (a layer ranking, acceptance rates, fitted
# maps), dropped with the engine. Keys name the method, its parameters and the calibration text (``text_key``).
_PER_ENGINE: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def per_engine(engine: Any, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` once per engine and key; every budget of a sweep then shares it."""
    got = _PER_ENGINE.setdefault(engine, {})
    if key not in got:
        got[key] = compute()
    return got[key]


def text_key(texts: list[list[int]]) -> tuple[int, int]:
    """A key for calibration token sequences: their count and a hash of their contents."""
    return len(texts), hash(tuple(tuple(t) for t in texts))


LENSES = ("auto", "plain")


def exit_lens(engine: Engine, lens: str) -> Translators | None:
    """What an exit decodes through: ``"plain"``, the final norm and head (the logit lens: None); ``"auto"``, the
    exit translators shipped for this model (``adapters/<name>/translators``) when they were trained on this very
    base, else plain; any other value is the path of a translators adapter, refused when it does not match."""
    if lens == "plain":
        return None

    def find() -> Translators | None:
        if lens == "auto":
            p = shipped_adapter(getattr(engine, "name", ""), "translators")
            if p is None:
                return None
            try:
                return load_translators(p, engine.model, engine.dtype, engine.device)
            except PonderError:  # shipped for another dtype or quantisation of this model: the plain lens
                return None
        return load_translators(Path(lens), engine.model, engine.dtype, engine.device)

    return per_engine(engine, ("lens", lens), find)


def draft_head(engine: Engine, head: str) -> DraftHead:
    """The draft head for ``engine``: ``"auto"``, the one shipped for this model; otherwise an adapter's path.
    Refused with one line when there is none or it was trained for another base."""
    def find() -> DraftHead:
        if head == "auto":
            p = shipped_adapter(getattr(engine, "name", ""), "draft-head")
            if p is None:
                raise PonderError(f"no draft head is shipped for model {engine.name!r}; train one with "
                                  "`ponder train draft-head --model ...` and pass head=PATH")
        else:
            p = Path(head)
        return load_draft_head(p, engine.model, engine.embed, engine.norm, engine.head, engine.cfg.rms_norm_eps,
                               engine.lin)

    return per_engine(engine, ("draft-head", head), find)


def has_draft_head(engine: Engine) -> bool:
    """Whether a draft head matching this very base ships for the model (``head="auto"`` would find it)."""
    try:
        draft_head(engine, "auto")
    except PonderError:
        return False
    return True


def lens_name(tr: Translators | None) -> str:
    """How a row's exits were decoded, for its description."""
    if tr is None:
        return "plain"
    return f"translators rank {tr.card.get('rank')} ({tr.card.get('base_fingerprint')})"


@dataclass
class Calibrated(Policy):
    """A policy that fits something on calibration text for one engine. ``calibration`` holds what was fitted (it is
    reported); ``fitted_for(engine)`` says whether it was fitted for this engine (a weak reference: a policy never
    keeps an engine alive), so a policy used on a second engine refits instead of reusing another model's fit."""

    calibration: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if k != "calibration"}

    def fitted(self, engine: Engine, result: dict[str, Any]) -> None:
        self.calibration = result
        self._fit_engine = weakref.ref(engine)

    def fitted_for(self, engine: Engine) -> bool:
        ref = getattr(self, "_fit_engine", None)
        return ref is not None and ref() is engine


class StaticPlanner(PlannerBase):
    """The same plan for every step: per layer None (dense), or a whole-layer / whole-unit skip."""

    def __init__(self, plans: list[LayerPlan | None]):
        self.plans = plans

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> LayerPlan | None:
        return self.plans[i]


def layer_flops_share(engine: Engine) -> tuple[float, float]:
    """(attention share, FFN share) of a layer's per-token projection FLOPs: how much skipping each unit saves."""
    c = engine.cfg
    tot = c.attn_proj_params + c.ffn_params
    return c.attn_proj_params / tot, c.ffn_params / tot


def unit_shares(engine: Engine) -> tuple[float, float, float]:
    """Shares of a layer's per-token projection FLOPs: attention's Q and O, its K and V (paid by every token that
    leaves K/V: ``kv="compute"``), the FFN's. The engine's stats count the same three."""
    c = engine.cfg
    tot = c.attn_proj_params + c.ffn_params
    return (c.attn_proj_params - c.kv_proj_params) / tot, c.kv_proj_params / tot, c.ffn_params / tot


_ = asdict  # re-exported convenience for subclasses' serialisation
