"""Trained additions to a frozen base model (exit translators, a draft head): a safetensors file beside a JSON card.

Why a card and a fingerprint: an adapter is only meaningful on the exact weights it was trained on; applied to
another model (or another quantisation of the same one) it silently degrades everything. So every adapter records
``fingerprint(engine)`` of its base, and loading refuses a mismatch with one line. The card also carries how it was
made (data, steps, minutes, tokens) and its held-out numbers, so a user can judge it without retraining.

Shipped adapters live in ``adapters/<model name>/`` at the repository root (or ``ponder/_adapters/`` in a wheel).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PonderError
from . import quant
from .llama import rms_norm


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of every weight's bytes in name order, as the engine holds them (so the same
    weights in another dtype are another base). A block-quantised matrix counts as its dequantised float32 values:
    a GGUF opened with native weights and the same file dequantised are one base (the adapters trained on one serve
    the other). Cached on the module: ~0.5 s for a 135M model."""
    fp = getattr(model, "_ponder_fingerprint", None)
    if fp is None:
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            t = quant.dequantize(t) if quant.is_quantised(t) else t
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())
        fp = h.hexdigest()[:16]
        model._ponder_fingerprint = fp
    return fp


def translate(h: torch.Tensor, u: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A translator's map, h + (h u) v + b: one definition for training and for the exits that use it."""
    return h + (h @ u) @ v + b


def draft_feature(f: torch.Tensor, e: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  norm: torch.Tensor, eps: float, lin: Callable[..., torch.Tensor] = F.linear) -> torch.Tensor:
    """The draft head's next feature from feature ``f`` and token embedding ``e``: one definition for training and
    for drafting (``lin``: the product, a quantised-weights kernel at run time on native weights)."""
    return f + lin(F.silu(lin(torch.cat([rms_norm(f, norm, eps), e], -1), w1, b1)), w2)


def shipped_dir(model_name: str) -> Path | None:
    """Where the adapters shipped for a catalogue model live, or None."""
    here = Path(__file__).resolve()
    for p in (here.parents[3] / "adapters" / model_name, here.parents[1] / "_adapters" / model_name):
        if p.is_dir():
            return p
    return None


def shipped_adapter(model_name: str, kind: str) -> Path | None:
    """The ``kind`` adapter shipped for a catalogue model (``adapters/<name>/<kind>.safetensors``), or None."""
    d = shipped_dir(model_name)
    p = d / f"{kind}.safetensors" if d is not None else None
    return p if p is not None and p.is_file() else None


@dataclass
class Translators:
    """Per exit depth ``d`` (layers run), an affine low-rank map of the residual state, h + (h u) v + b, trained so
    that the state after ``d`` layers decodes through the final norm and the shared head like the final state does
    (the tuned lens). At zero it is the identity, and the lens is the plain logit lens."""

    maps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    card: dict[str, Any] = field(default_factory=dict)

    def __call__(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        m = self.maps.get(depth)
        if m is None:
            return h
        return translate(h, *m)

    def has(self, depth: int) -> bool:
        return depth in self.maps

    def to(self, dtype: torch.dtype, device: torch.device | str) -> Translators:
        return Translators({d: tuple(t.to(dtype=dtype, device=device) for t in m) for d, m in self.maps.items()},
                           self.card)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for d, (u, v, b) in self.maps.items():
            out[f"t{d}.u"], out[f"t{d}.v"], out[f"t{d}.b"] = u.contiguous(), v.contiguous(), b.contiguous()
        return out


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """``path`` (.safetensors) and its card (same name, .json); the card's ``kind`` and ``base_fingerprint`` are
    what ``load_adapter`` checks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"kind": str(card["kind"]), "base": str(card["base_fingerprint"])})
    path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")


def adapter_paths(out: Path) -> tuple[Path, Path]:
    """For an adapter named ``out`` (with or without ``.safetensors``): its file and its training checkpoint
    (``<name>.partial.safetensors``, what a resumed run continues from). Not ``with_suffix``: "router-0.75" has a
    dot."""
    out = Path(out)
    if out.suffix == ".safetensors":
        out = out.with_suffix("")
    return out.parent / (out.name + ".safetensors"), out.parent / (out.name + ".partial.safetensors")


def load_adapter(path: Path, kind: str, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and card of an adapter file, after checking that it is a ``kind`` adapter for this very base."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.is_file():
        raise PonderError(f"adapter {path} does not exist; train one with `ponder train {kind}` or give its path")
    if not card_path.is_file():
        raise PonderError(f"adapter {path} has no card {card_path.name} beside it; it cannot be checked against "
                          "its base model, so it is not used")
    try:
        card = json.loads(card_path.read_text())
        tensors = load_file(str(path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise PonderError(f"adapter {path} is unreadable ({e}); retrain it with `ponder train {kind}`") from None
    if card.get("kind") != kind:
        raise PonderError(f"{path} is a {card.get('kind')!r} adapter, not a {kind!r} one")
    want = fingerprint(model)
    if card.get("base_fingerprint") != want:
        raise PonderError(f"adapter {path} was trained for another base model (fingerprint "
                          f"{card.get('base_fingerprint')}, this model's is {want}); retrain it for this model with "
                          f"`ponder train {kind} --model ...`")
    return tensors, card


def load_translators(path: Path, model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str
                     ) -> Translators:
    tensors, card = load_adapter(path, "translators", model)
    depths = sorted({int(k.split(".")[0][1:]) for k in tensors})
    maps = {d: (tensors[f"t{d}.u"], tensors[f"t{d}.v"], tensors[f"t{d}.b"]) for d in depths}
    return Translators(maps, card).to(dtype, device)


@dataclass
class LayerReplacement:
    """A healed layer drop's stand-in for one dropped layer: its residual update approximated by a low-rank affine
    map of the layer's input, (h u) v + b (ReplaceMe / LLM-Streamline's idea: fit a cheap map to what the removed
    layers did, instead of retraining the ones that remain). Zero maps are the unhealed drop."""

    u: torch.Tensor  # (D, r)
    v: torch.Tensor  # (r, D)
    b: torch.Tensor  # (D,)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        # (h u) v + b in two calls: at batch 1 each call's fixed cost is most of this map's time
        return torch.addmm(self.b, h @ self.u, self.v) if h.dim() == 2 else (h @ self.u) @ self.v + self.b

    def flops_per_row(self) -> float:
        return 2.0 * (self.u.numel() + self.v.numel())


def load_replacements(path: Path, model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str
                      ) -> tuple[dict[int, LayerReplacement], dict[str, Any]]:
    """A ``layer-heal`` adapter: per dropped layer its replacement, and the card (budget, dropped layers)."""
    tensors, card = load_adapter(path, "layer-heal", model)
    layers = sorted({int(k.split(".")[0][1:]) for k in tensors})
    reps = {i: LayerReplacement(*(tensors[f"l{i}.{k}"].to(dtype=dtype, device=device) for k in "uvb"))
            for i in layers}
    if sorted(reps) != sorted(card.get("dropped", [])):
        raise PonderError(f"adapter {path} is inconsistent: its card drops {card.get('dropped')} but it holds maps "
                          f"for {sorted(reps)}; retrain it with `ponder train layer-heal`")
    return reps, card


@dataclass
class DraftHead:
    """A drafter on the model's final features (EAGLE's idea, as a residual MLP instead of EAGLE's decoder layer):
    from the final feature ``f`` that produced token ``x`` and ``x``'s embedding, the feature the model will have
    after ``x``: f' = f + W2 silu(W1 [norm(f); embed(x)] + b1). Its next token comes from the final norm and the
    LM head restricted to ``vocab`` (the tokens the model emits most: FR-Spec's observation that a tied 49k-token head
    is a fifth of the model, and a few thousand rows carry nearly all of its greedy choices). Chained ``k`` times it
    proposes ``k`` drafts for one verification pass; no KV cache of its own."""

    w1: torch.Tensor  # (H, 2D)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (D, H)
    vocab: torch.Tensor  # (Vr,) long: full-vocabulary ids of the reduced head's rows
    embed: torch.Tensor  # (V, D) the model's input embedding
    norm: torch.Tensor  # (D,) the model's final norm weight
    head: torch.Tensor  # (Vr, D) the model's LM head rows for ``vocab``
    eps: float
    card: dict[str, Any] = field(default_factory=dict)
    lin: Callable[..., torch.Tensor] = quant.linear  # the product (either weight form)

    def step(self, f: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) features and (B,) tokens -> the next features and their reduced-vocabulary logits (B, Vr)."""
        f2 = draft_feature(f, quant.rows(self.embed, x), self.w1, self.b1, self.w2, self.norm, self.eps, self.lin)
        return f2, self.lin(rms_norm(f2, self.norm, self.eps), self.head)

    @classmethod
    def on(cls, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, vocab: torch.Tensor, embed: torch.Tensor,
           norm: torch.Tensor, head: torch.Tensor, eps: float, card: dict[str, Any],
           lin: Callable[..., torch.Tensor] = quant.linear) -> DraftHead:
        """A head's weights put on a model: its dtype and device, and the LM head's rows for ``vocab``. On a model
        with block-quantised weights the reduced head keeps the model's own blocks for those rows, and W1 / W2 are
        quantised to Q8_0 (a draft is only a proposal: the output stays the model's; measured on SmolLM2 Q4_1, a
        draft step at float32 read ~30 MB, a quarter of a decode step's weights)."""
        dt, vocab = norm.dtype, vocab.long().to(embed.device)
        if quant.is_quantised(head):
            rows = quant.deinterleave(head)[vocab]
            kern = quant.interleave if rows.shape[0] % quant.ROWS == 0 else (lambda t: t)
            w1q, w2q = (kern(quant.quantize(w.float(), "Q8_0")) for w in (w1, w2))
            return cls(w1q, b1.to(dt), w2q, vocab, embed, norm, kern(rows), eps, card, lin)
        return cls(w1.to(dt), b1.to(dt), w2.to(dt), vocab, embed, norm, quant.rows(head, vocab).to(dt).contiguous(),
                   eps, card, lin)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1.contiguous(), "b1": self.b1.contiguous(), "w2": self.w2.contiguous(),
                "vocab": self.vocab.contiguous()}


def load_draft_head(path: Path, model: torch.nn.Module, embed: torch.Tensor, norm: torch.Tensor,
                    head: torch.Tensor, eps: float, lin: Callable[..., torch.Tensor] = quant.linear) -> DraftHead:
    t, card = load_adapter(path, "draft-head", model)
    return DraftHead.on(t["w1"], t["b1"], t["w2"], t["vocab"], embed, norm, head, eps, card, lin)


ROUTER_UNITS = {"attn+ffn": 2, "layer": 1}


def router_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A router's run-logits for states ``x`` (..., D): a linear map of the RMS-normalised state, ``w`` (U, D),
    ``b`` (U,). Written as a product and a last-axis sum, not a matmul: each row's reductions are then the same
    whether it is decided alone or in a batch (a matmul's kernel, and so its rounding, changes with the row count),
    so a decision never flips between a batch and its rows. One definition for training and for deciding."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (xf.unsqueeze(-2) * w).sum(-1) * r + b


@dataclass
class Router:
    """Per layer a tiny linear decision module on the layer's input state (Router-Tuning / MindSkip's router, one
    per unit): ``units`` "attn+ffn" gives two run-logits per token and layer (attention, FFN; decided together
    before the layer, from its input), "layer" one (the whole layer). A unit runs where its logit plus the policy's
    offset is positive; trained on a frozen base by distilling its dense logits under a budget
    (``ponder train router``)."""

    w: torch.Tensor  # (L, U, D) float32
    b: torch.Tensor  # (L, U) float32
    units: str = "attn+ffn"
    card: dict[str, Any] = field(default_factory=dict)

    def logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return router_logits(x, self.w[i], self.b[i])

    def flops_per_row(self) -> float:
        """Per token and layer: the normalisation and one dot product per unit."""
        U, D = self.w.shape[1], self.w.shape[2]
        return float(2 * U * D + 3 * D)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.contiguous(), "b": self.b.contiguous()}


def load_router(path: Path, model: torch.nn.Module, device: torch.device | str) -> Router:
    """A ``router`` adapter for this very base (refused with one line otherwise)."""
    t, card = load_adapter(path, "router", model)
    units = card.get("units", "attn+ffn")
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    if units not in ROUTER_UNITS or tuple(t["w"].shape) != (L, ROUTER_UNITS[units], D):
        raise PonderError(f"router {path} is inconsistent (units {units!r}, weights {tuple(t['w'].shape)}); retrain "
                          "it with `ponder train router`")
    return Router(t["w"].float().to(device), t["b"].float().to(device), units, card)
