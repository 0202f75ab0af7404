"""The library's front door: open a model, generate, score.

``load`` returns an :class:`~ponder.engine.forward.Engine` (weights + tokenizer + the plan-driven forward pass);
everything else in ponder takes that engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .engine.forward import Engine
from .errors import PonderError
from .models.config import ModelConfig
from .models.loader import load_folder
from .models.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def ref_model_path() -> Path:
    """The shipped reference model: ``models/ref`` in a source checkout, or the copy installed with the package."""
    here = Path(__file__).resolve()
    for p in (here.parents[2] / "models" / "ref", here.parent / "_ref"):
        if (p / "config.json").is_file():
            return p
    raise PonderError("the shipped reference model is missing (models/ref); reinstall ponder from its repository")


def resolve_model(name: str | Path) -> Path:
    return ref_model_path() if str(name) == "ref" else Path(name)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PonderError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
        dtype = DTYPES[dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise PonderError("float16 is not supported on CPU; use float32 or bfloat16 (or --device cuda)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PonderError("this GPU does not support bfloat16; use float16 or float32")
    return dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise PonderError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if d.type not in ("cpu", "cuda"):
        raise PonderError(f"unsupported device {device!r}; use cpu or cuda")
    return d


def load(path: str | Path = "ref", dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None) -> Engine:
    """Open a local Hugging Face checkpoint folder ("ref" = the shipped model) for inference."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = resolve_model(path)
    model, folder = load_folder(folder, dtype=dt)
    # A folder without tokenizer.json still serves token ids; text in or out then raises a clear error.
    tok = Tokenizer(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
    eng = Engine(model.to(dev), tok)
    eng.name = "ref" if str(path) == "ref" else folder.name
    eng.path = folder
    eng.generation_config = _read_generation_config(folder)
    return eng


def _read_generation_config(folder: Path) -> dict[str, Any]:
    import json

    p = folder / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PonderError(f"{p} is not valid JSON ({e})") from None


def from_hf(model: Any, tokenizer: Any = None) -> Engine:
    """Wrap an in-memory transformers model of a supported family, borrowing its tensors (no copy)."""
    from .models.llama import LlamaModel

    cfg = ModelConfig.from_dict(model.config.to_dict())
    inner = model.model
    with torch.device("meta"):
        shell = LlamaModel(cfg)
    shell.model = inner  # same parameter names as transformers' Llama/Mistral/Qwen modules
    if not cfg.tie_word_embeddings:
        shell.lm_head = model.lm_head
    from .models.config import rope_inv_freq

    shell.register_buffer("inv_freq", rope_inv_freq(cfg).to(inner.embed_tokens.weight.device), persistent=False)
    eng = Engine(shell, Tokenizer.from_object(tokenizer) if tokenizer is not None else None, fuse=False)
    eng.name = getattr(model.config, "_name_or_path", "") or cfg.model_type
    eng.generation_config = {}
    return eng
