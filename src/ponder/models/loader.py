"""Open a local Hugging Face checkpoint folder: safetensors only, shapes checked against the config.

Why so strict: a pickle can run code on load, and a silently mis-shaped tensor gives plausible garbage. Every
problem a user can fix becomes one PonderError line that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import PonderError
from . import quant
from .config import ModelConfig, rope_inv_freq
from .llama import LlamaModel

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def _convert_hint(folder: Path) -> str:
    return (f"ponder loads safetensors only (pickles can execute code); convert it once with transformers: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}-st', safe_serialization=True)\"")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise PonderError(f"{index} is corrupt ({e}); re-export the checkpoint") from None
        files = [folder / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PonderError(f"{folder} lacks shard(s) {', '.join(missing)} named in {index.name}")
    else:
        if any((folder / n).exists() for n in PICKLE_NAMES) or list(folder.glob("*.bin")):
            raise PonderError(f"{folder} holds a pickle checkpoint; {_convert_hint(folder)}")
        raise PonderError(f"{folder} has no model.safetensors (or sharded model.safetensors.index.json)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise PonderError(f"{f} is corrupt or truncated ({e}); re-download or re-export it") from None
    return out


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype | None) -> LlamaModel:
    """Place checkpoint tensors into a LlamaModel by name; every missing, extra or mis-shaped tensor is an error."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        # Some exports drop the head when it equals the embedding even though the config says untied.
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise PonderError(f"checkpoint tensors disagree with config.json: missing {missing[:4]}"
                          f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                          f"{'...' if len(unexpected) > 4 else ''}")
    for k, t in expected.items():
        shape = quant.logical_shape(weights[k]) if quant.is_quantised(weights[k]) else tuple(weights[k].shape)
        if shape != tuple(t.shape):
            raise PonderError(f"tensor {k} has shape {shape} but config.json implies "
                              f"{tuple(t.shape)}; the config and weights belong to different models")
    floats = {k: v for k, v in weights.items() if not quant.is_quantised(v)}
    tgt = dtype or next(iter(floats.values())).dtype
    model.load_state_dict({k: v.to(tgt) for k, v in floats.items()}, assign=True, strict=False)
    for k, v in weights.items():  # block-quantised matrices stay as they are (their shape is not the float one)
        if quant.is_quantised(v):
            mod_name, _, attr = k.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(v, requires_grad=False))
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # the meta-device copy is useless
    return model.eval().requires_grad_(False)


def load_folder(path: str | Path, dtype: torch.dtype | None = None, quantize: str | None = None
                ) -> tuple[LlamaModel, Path]:
    """A checkpoint folder as a model; ``quantize`` ("q8_0", "q4_0", "q4_1") quantises its matrices first."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise PonderError(f"model folder {folder} does not exist; pass a local Hugging Face checkpoint folder "
                          "or --model ref for the shipped model")
    if not folder.is_dir():
        raise PonderError(f"{folder} is a file; --model takes a checkpoint folder (config.json, *.safetensors)")
    cfg = ModelConfig.from_file(folder / "config.json")
    weights = read_safetensors(folder)
    if quantize:
        weights = quant.quantize_state({k: v.float() for k, v in weights.items()}, quantize)
    return build_model(cfg, weights, dtype), folder
